//! What the modems receive, taken into the job store:
//! - received SMS, part by part ([`Store::inbound`]): re-reads are recognised, parts are joined
//!   in order whatever order they came in (across restarts: they are stored), and a message
//!   whose parts did not all come within `agent.inbox_part_timeout` goes out with what came,
//!   marked partial. Joined messages are queued for the inbox channel.
//! - delivery reports, matched to the jobs they report on ([`Store::apply_report`]), whose
//!   `delivered` / `failed` events then go to the broker like every other status event. A
//!   report that matches nothing is logged with what it says and counted, never dropped
//!   silently.
//!
//! The modem deletes its copy only once this has answered that the store has it.

use std::time::Duration;

use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};
use wsmb_protocol::sms::Status;

use crate::modem::Incoming;
use crate::pdu::ReportOutcome;
use crate::store::{Inbound, ReportMatch, Store};

/// Takes what the modems hand over until `shutdown` (or until every modem is gone); parts that
/// waited longer than `part_timeout` are published as partial messages.
pub async fn run(
    store: Store,
    mut rx: mpsc::Receiver<Incoming>,
    part_timeout: Duration,
    shutdown: CancellationToken,
) {
    let mut flush = tokio::time::interval(
        (part_timeout / 4).clamp(Duration::from_millis(200), Duration::from_secs(30)),
    );
    flush.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let item = tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = flush.tick() => {
                match store.flush_partial(part_timeout).await {
                    Ok(done) => {
                        for m in done {
                            warn!(
                                id = %m.id, sender = %m.sender,
                                "received SMS published incomplete: its other parts did not come \
                                 within {part_timeout:?} (agent.inbox_part_timeout)"
                            );
                        }
                    }
                    Err(e) => warn!("job store: {e}"),
                }
                continue;
            }
            item = rx.recv() => match item {
                Some(i) => i,
                None => return,
            },
        };
        match item {
            Incoming::Sms { modem, sms, stored } => {
                let r = store.inbound(&modem, &sms).await;
                match &r {
                    Ok(Inbound::Joined(m)) => info!(
                        id = %m.id, modem = %modem, sender = %m.sender,
                        "SMS received ({} part(s))", m.parts
                    ),
                    Ok(Inbound::Waiting { have, total }) => debug!(
                        modem = %modem, sender = %sms.sender,
                        "part {have} of {total} of an SMS received; waiting for the others"
                    ),
                    Ok(Inbound::Duplicate) => debug!(
                        modem = %modem, sender = %sms.sender,
                        "an SMS part read again: taken already"
                    ),
                    Err(e) => warn!(modem = %modem, "job store: received SMS not recorded: {e}"),
                }
                let _ = stored.send(r.is_ok());
            }
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
