//! AMQP reply codes (AMQP 0-9-1 section 1.3 and RabbitMQ's extensions) used by lepus.

/// 200: normal close.
pub const REPLY_SUCCESS: u16 = 200;
/// 311: content too large (soft error).
pub const CONTENT_TOO_LARGE: u16 = 311;
/// 312: mandatory message had no route (used in basic.return).
pub const NO_ROUTE: u16 = 312;
/// 320: the broker or an operator closed the connection.
pub const CONNECTION_FORCED: u16 = 320;
/// 402: the vhost path is invalid.
pub const INVALID_PATH: u16 = 402;
/// 403: access refused (e.g. to a vhost or resource).
pub const ACCESS_REFUSED: u16 = 403;
/// 404: entity not found.
pub const NOT_FOUND: u16 = 404;
/// 405: resource locked (exclusive queue of another connection).
pub const RESOURCE_LOCKED: u16 = 405;
/// 406: precondition failed (e.g. unknown delivery tag).
pub const PRECONDITION_FAILED: u16 = 406;
/// 501: malformed frame.
pub const FRAME_ERROR: u16 = 501;
/// 502: a field value could not be decoded.
pub const SYNTAX_ERROR: u16 = 502;
/// 503: a method that is invalid in this state.
pub const COMMAND_INVALID: u16 = 503;
/// 504: a frame on a channel that is not open.
pub const CHANNEL_ERROR: u16 = 504;
/// 505: a frame that the peer did not expect.
pub const UNEXPECTED_FRAME: u16 = 505;
/// 506: the peer ran out of a resource.
pub const RESOURCE_ERROR: u16 = 506;
/// 530: the action is not allowed.
pub const NOT_ALLOWED: u16 = 530;
/// 540: not implemented.
pub const NOT_IMPLEMENTED: u16 = 540;
/// 541: internal error.
pub const INTERNAL_ERROR: u16 = 541;
