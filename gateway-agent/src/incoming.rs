//! What the modems receive, taken into the job store: delivery reports matched to the jobs
//! they report on ([`Store::apply_report`]), whose `delivered` / `failed` events then go to the
//! broker like every other status event. A report that matches nothing is logged with what it
//! says and counted, never dropped silently.

use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};
use wsmb_protocol::sms::Status;

use crate::modem::Incoming;
use crate::pdu::ReportOutcome;
use crate::store::{ReportMatch, Store};

/// Takes what the modems hand over until `shutdown` (or until every modem is gone).
pub async fn run(store: Store, mut rx: mpsc::Receiver<Incoming>, shutdown: CancellationToken) {
    loop {
        let item = tokio::select! {
            _ = shutdown.cancelled() => return,
            item = rx.recv() => match item {
                Some(i) => i,
                None => return,
            },
        };
        match item {
            Incoming::Report {
                modem,
                report,
                stored,
            } => {
                let r = store.apply_report(&modem, &report).await;
                let ok = r.is_ok();
                match r {
                    Ok(ReportMatch::Unmatched) => info!(
                        modem = %modem,
                        "delivery report for message reference {} to {} matches no SMS sent \
                         through this modem ({}); counted as unmatched",
                        report.mr,
                        report.recipient,
                        report.meaning()
                    ),
                    Ok(ReportMatch::Recorded { job, event }) => match event {
                        Some(Status::Delivered) => info!(job = %job, "delivered"),
                        Some(_) => warn!(job = %job, "not delivered: {}", report.meaning()),
                        None if report.outcome() == ReportOutcome::Pending => debug!(
                            job = %job,
                            "not delivered yet: {}", report.meaning()
                        ),
                        None => debug!(job = %job, "part report recorded: {}", report.meaning()),
                    },
                    Err(e) => warn!(modem = %modem, "job store: delivery report not recorded: {e}"),
                }
                let _ = stored.send(ok);
            }
        }
    }
}
