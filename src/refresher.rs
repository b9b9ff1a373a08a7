//! The credentials refresher: a thread per connection whose provider says its secret
//! expires; it asks the provider again before it does and sends the broker the new
//! secret (`connection.update-secret`), reporting each refresh as a recovery event.

use std::time::{Duration, Instant};

use crate::connection_state::ConnectionInner;
use crate::error::{Error, Result};
use crate::events::RecoveryEventKind;
use crate::secrets::Secrets;
use crate::sync::{Arc, Weak};

/// When the refresher first retries a failed refresh; it doubles up to a quarter of the
/// time left.
const RETRY_FIRST: Duration = Duration::from_millis(500);

/// Start the refresher of a connection whose provider may report expiry. It holds the
/// connection weakly and ends when the connection is closed or dropped.
pub(crate) fn start_refresher(inner: &Arc<ConnectionInner>, secrets: Arc<Secrets>) {
    if secrets.provider.is_none() {
        return;
    }
    let weak = Arc::downgrade(inner);
    let spawned = std::thread::Builder::new()
        .name("lepus-credentials".into())
        .spawn(move || refresh_loop(&weak, &secrets));
    if let Err(e) = spawned {
        crate::trace::error!("could not start the credentials refresher: {e}");
    }
}

fn refresh_loop(weak: &Weak<ConnectionInner>, secrets: &Secrets) {
    let mut retry = RETRY_FIRST;
    while secrets.wait_due() {
        let Some(inner) = weak.upgrade() else {
            return;
        };
        match refresh_once(&inner, secrets) {
            Ok(expires_in) => {
                retry = RETRY_FIRST;
                inner.event(
                    inner.current_generation(),
                    RecoveryEventKind::SecretRefreshed { expires_in },
                );
            }
            Err(e) => {
                crate::trace::warn!("credentials refresh failed (retrying in {retry:?}): {e}");
                inner.event(
                    inner.current_generation(),
                    RecoveryEventKind::SecretRefreshFailed(e.to_string()),
                );
                // Retry soon, but not in a busy loop; never later than a quarter of the
                // time the current secret has left.
                let cap = secrets
                    .time_left()
                    .map(|d| (d / 4).max(Duration::from_millis(100)))
                    .unwrap_or(Duration::from_secs(30));
                secrets.retry_later(retry.min(cap));
                retry = (retry * 2).min(Duration::from_secs(30));
            }
        }
    }
}

/// Ask the provider and send the new secret on the current connection.
fn refresh_once(inner: &ConnectionInner, secrets: &Secrets) -> Result<Option<Duration>> {
    let Some(p) = &secrets.provider else {
        return Ok(None);
    };
    let c =
        p.0.credentials()
            .map_err(|e| Error::AuthenticationFailed(format!("credentials provider: {e}")))?;
    let deadline = Instant::now() + inner.opts.operation_timeout;
    inner.update_secret(&c.secret, "lepus: scheduled credentials refresh", deadline)?;
    secrets.schedule(c.expires_in);
    crate::trace::info!(
        "credentials refreshed (valid for {:?})",
        c.expires_in.unwrap_or_default()
    );
    Ok(c.expires_in)
}
