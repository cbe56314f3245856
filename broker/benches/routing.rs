//! Micro-benchmarks of routing: the delivery engine's memory backend handing a `send-message`
//! to its receivers' outgoing queues (channel lookup, rotation, the receiver limit, the
//! bounds), and the queue given back as the writer would. No sockets. `cargo bench -p
//! wsmb-broker --bench routing`; figures in docs/benchmarks.md.

#![allow(missing_docs)]

use std::sync::Arc;
use std::time::{Duration, Instant};

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use std::hint::black_box;
use wsmb_broker::delivery::{DeliveryConfig, Engine, Publish, Subscriber};
use wsmb_broker::outbox::Outbox;
use wsmb_broker::stats::Stats;
use wsmb_broker::ws::Text;

const FRAME: &str = r#"{"command":"send-message","channel":"bench","number_of_receiver":1,"data":[{"id":"42","t":123456789,"p":"xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx"}]}"#;

struct Bed {
    rt: tokio::runtime::Runtime,
    engine: Arc<Engine>,
    outboxes: Vec<Arc<Outbox>>,
    _token: tokio_util::sync::CancellationToken,
}

/// A memory-mode engine with `receivers` receivers on `bench`.
fn bed(receivers: u64) -> Bed {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a tokio runtime");
    let mut cfg = wsmb_broker::Config::default();
    cfg.storage.backend = wsmb_broker::config::Backend::Memory;
    let token = tokio_util::sync::CancellationToken::new();
    let engine = rt.block_on(async {
        Engine::new(
            DeliveryConfig::from_config(&cfg),
            None,
            Arc::new(Stats::default()),
            token.clone(),
        )
    });
    let mut outboxes = Vec::new();
    for conn in 1..=receivers {
        let outbox = Arc::new(Outbox::for_conn(conn, 1024, 4 << 20));
        engine.subscribe(
            "bench",
            Subscriber {
                conn,
                outbox: Arc::clone(&outbox),
                ack: false,
                window: 0,
            },
        );
        outboxes.push(outbox);
    }
    Bed {
        rt,
        engine,
        outboxes,
        _token: token,
    }
}

impl Bed {
    /// Publishes `iters` messages with `limit`, emptying the queues every 64 as a writer
    /// would; the time of it all.
    fn run(&self, iters: u64, limit: u32, channel: &str) -> Duration {
        let frame = Text::from_string(FRAME.to_owned());
        let mut batch = Vec::new();
        self.rt.block_on(async {
            let start = Instant::now();
            for i in 0..iters {
                let accepted = self
                    .engine
                    .publish(Publish {
                        sender: 0,
                        channel,
                        message_id: format!("19ac8f0e1b2-{i}"),
                        frame: frame.clone(),
                        limit,
                        expires_at: None,
                        report: None,
                    })
                    .await;
                black_box(accepted.outcome().await);
                if i % 64 == 63 {
                    for o in &self.outboxes {
                        o.take(&mut batch, usize::MAX);
                        let bytes = batch.iter().map(|b| b.counted).sum();
                        batch.clear();
                        o.release(bytes);
                    }
                }
            }
            start.elapsed()
        })
    }
}

fn routing(c: &mut Criterion) {
    let mut g = c.benchmark_group("memory publish");
    g.throughput(Throughput::Elements(1));
    let one = bed(1);
    g.bench_function("1 receiver", |b| b.iter_custom(|n| one.run(n, 1, "bench")));
    let four = bed(4);
    g.bench_function("1 of 4 receivers (rotation)", |b| {
        b.iter_custom(|n| four.run(n, 1, "bench"))
    });
    g.bench_function("all of 4 receivers", |b| {
        b.iter_custom(|n| four.run(n, 0, "bench"))
    });
    let many = bed(100);
    g.bench_function("1 of 100 receivers (rotation)", |b| {
        b.iter_custom(|n| many.run(n, 1, "bench"))
    });
    g.bench_function("no receiver", |b| {
        b.iter_custom(|n| one.run(n, 1, "nobody"))
    });
    g.finish();
}

criterion_group!(benches, routing);
criterion_main!(benches);
