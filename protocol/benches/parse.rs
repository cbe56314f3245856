//! Micro-benchmarks of the protocol crate: parsing the frames a client sends (the broker does
//! this for every frame it reads) and building the frames it sends back. `cargo bench -p
//! wsmb-protocol`; figures in docs/benchmarks.md.

#![allow(missing_docs)]

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use std::hint::black_box;
use wsmb_protocol::{ResponseCode, parse_client_frame, reply, sms};

/// A `send-message` of about 200 bytes, as the throughput benchmark sends.
fn send_200() -> String {
    format!(
        r#"{{"command":"send-message","channel":"bench","number_of_receiver":1,"data":[{{"id":"42","t":123456789,"p":"{}"}}]}}"#,
        "x".repeat(120)
    )
}

/// An SMS job batch of 20 items (what an application sends on `sms`).
fn jobs_20() -> String {
    let items: Vec<String> = (0..20)
        .map(|i| format!(r#"{{"id":"otp-{i}","receiver":"+6281234567{i:02}","message":"Your code is {i:06}"}}"#))
        .collect();
    format!(
        r#"{{"command":"send-message","channel":"sms","data":[{}]}}"#,
        items.join(",")
    )
}

fn parsing(c: &mut Criterion) {
    let mut g = c.benchmark_group("parse_client_frame");
    for (name, frame) in [
        ("send-message 200 B", send_200()),
        ("send-message 20 jobs", jobs_20()),
        (
            "receive-message",
            r#"{"command":"receive-message","channel":"sms","protocol":2,"ack":true,"window":64}"#
                .into(),
        ),
        (
            "ack 64 ids",
            format!(
                r#"{{"command":"ack","data":[{}]}}"#,
                (0..64)
                    .map(|i| format!(r#""19ac8f0e1b2-{i}""#))
                    .collect::<Vec<_>>()
                    .join(",")
            ),
        ),
        ("ping", r#"{"command":"ping"}"#.into()),
    ] {
        g.throughput(Throughput::Bytes(frame.len() as u64));
        g.bench_function(name, |b| {
            b.iter(|| {
                let f = parse_client_frame(black_box(frame.as_bytes()));
                black_box(f.is_ok())
            })
        });
    }
    g.finish();
}

fn jobs(c: &mut Criterion) {
    let frame = jobs_20();
    c.bench_function("sms::parse_jobs 20 jobs", |b| {
        b.iter(|| black_box(sms::parse_jobs(black_box(&frame)).map(|(_, j)| j.len())))
    });
}

fn replies(c: &mut Criterion) {
    let frame = send_200();
    c.bench_function("reply::deliver 200 B", |b| {
        b.iter(|| {
            black_box(reply::deliver(
                "19ac8f0e1b2-42",
                "bench",
                1,
                black_box(&frame),
            ))
        })
    });
    c.bench_function("reply::error", |b| {
        b.iter(|| {
            black_box(reply::error(
                ResponseCode::InvalidField,
                "the field \"channel\" is missing".into(),
                Some("send-message"),
            ))
        })
    });
}

criterion_group!(benches, parsing, jobs, replies);
criterion_main!(benches);
