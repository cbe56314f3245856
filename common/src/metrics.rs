//! Prometheus metrics in the text format, for the broker's `/metrics` and the agent's loopback
//! endpoint: a [`Snapshot`] of figures read at scrape time (from atomics the programs keep
//! anyway), encoded by the `prometheus-client` crate. Nothing here runs per message.

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::registry::Registry;

/// The content type of [`Snapshot::render`]'s text.
pub const CONTENT_TYPE: &str = prometheus_client::encoding::prometheus_text::CONTENT_TYPE;

/// Labels of one series: name and value.
pub type Labels = Vec<(&'static str, String)>;

/// One series: name (without the prefix), help, labels, value, and whether it is a counter.
#[derive(Debug, Clone)]
struct Series {
    name: &'static str,
    help: &'static str,
    labels: Labels,
    value: i64,
    counter: bool,
}

/// What one scrape read. Series of one family must be pushed one after the other.
#[derive(Debug, Default)]
pub struct Snapshot(Vec<Series>);

fn signed(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

impl Snapshot {
    /// A counter without labels (`_total` is appended to its name).
    pub fn counter(&mut self, name: &'static str, help: &'static str, value: u64) {
        self.push(name, help, Vec::new(), signed(value), true);
    }

    /// A gauge without labels.
    pub fn gauge(&mut self, name: &'static str, help: &'static str, value: i64) {
        self.push(name, help, Vec::new(), value, false);
    }

    /// A counter with labels.
    pub fn counter_with(
        &mut self,
        name: &'static str,
        help: &'static str,
        labels: Labels,
        value: u64,
    ) {
        self.push(name, help, labels, signed(value), true);
    }

    /// One counter family split by label `key`: one series per `(value of key, count)`, each
    /// with `base` labels before it.
    pub fn counters_by<'a>(
        &mut self,
        name: &'static str,
        help: &'static str,
        base: &Labels,
        key: &'static str,
        values: impl IntoIterator<Item = (&'a str, u64)>,
    ) {
        for (k, v) in values {
            let mut labels = base.clone();
            labels.push((key, k.to_owned()));
            self.counter_with(name, help, labels, v);
        }
    }

    /// A gauge with labels.
    pub fn gauge_with(&mut self, name: &'static str, help: &'static str, labels: Labels, v: i64) {
        self.push(name, help, labels, v, false);
    }

    fn push(
        &mut self,
        name: &'static str,
        help: &'static str,
        labels: Labels,
        value: i64,
        counter: bool,
    ) {
        self.0.push(Series {
            name,
            help,
            labels,
            value,
            counter,
        });
    }

    /// The text, every name prefixed with `prefix_`.
    pub fn render(self, prefix: &str) -> String {
        let mut registry = Registry::with_prefix(prefix);
        registry.register_collector(Box::new(self));
        let mut out = String::new();
        if prometheus_client::encoding::prometheus_text::encode(&mut out, &registry).is_err() {
            out.clear();
        }
        out
    }
}

impl Collector for Snapshot {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let mut i = 0;
        while i < self.0.len() {
            let first = &self.0[i];
            let kind = if first.counter {
                ConstCounter::new(0u64).metric_type()
            } else {
                ConstGauge::new(0i64).metric_type()
            };
            let mut family = encoder.encode_descriptor(first.name, first.help, None, kind)?;
            while i < self.0.len() && self.0[i].name == first.name {
                let s = &self.0[i];
                let labels: Vec<(&str, &str)> =
                    s.labels.iter().map(|(k, v)| (*k, v.as_str())).collect();
                let series = family.encode_family(&labels)?;
                if s.counter {
                    ConstCounter::new(s.value.max(0) as u64).encode(series)?;
                } else {
                    ConstGauge::new(s.value).encode(series)?;
                }
                i += 1;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn families_with_labels_and_prefix() {
        let mut s = Snapshot::default();
        s.counter("jobs", "Jobs", 3);
        s.gauge_with("signal_dbm", "Signal", vec![("modem", "m1".into())], -71);
        s.gauge_with("signal_dbm", "Signal", vec![("modem", "m\"2".into())], -90);
        let text = s.render("x");
        assert!(
            text.contains("# TYPE x_jobs_total counter\nx_jobs_total 3\n"),
            "{text}"
        );
        assert!(text.contains("x_signal_dbm{modem=\"m1\"} -71\n"), "{text}");
        assert!(
            text.contains("x_signal_dbm{modem=\"m\\\"2\"} -90\n"),
            "{text}"
        );
        assert_eq!(
            text.matches("# TYPE x_signal_dbm gauge").count(),
            1,
            "{text}"
        );
    }
}
