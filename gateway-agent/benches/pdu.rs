//! Micro-benchmarks of the PDU codec: a text to SMS-SUBMIT TPDUs (encoding choice, splitting,
//! 7-bit packing or UCS-2), and a TPDU decoded back as the modem simulator does. `cargo bench
//! -p wsmb-agent --bench pdu`; figures in docs/benchmarks.md.

#![allow(missing_docs)]

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use std::hint::black_box;
use wsmb_agent::pdu::{Address, SubmitOptions, decode_submit, encode_submit};

fn encoding(c: &mut Criterion) {
    let number = Address::parse("+628123456789").expect("a valid number");
    let opts = SubmitOptions {
        status_report: true,
        validity: Some(std::time::Duration::from_secs(300)),
    };
    let otp = "Your verification code is 482913. It expires in 5 minutes.".to_owned();
    let long_gsm =
        "Dear customer, your order [#12345] has shipped; track it at {example}. ~Thanks! "
            .repeat(6);
    let ucs2 =
        "Kode verifikasi Anda: 482913 🔐 berlaku 5 menit. Jangan bagikan kode ini. ".repeat(3);
    let mut g = c.benchmark_group("encode_submit");
    for (name, text) in [
        ("OTP, 1 part GSM 7-bit", &otp),
        (
            "480 chars with extension chars, 4 parts GSM 7-bit",
            &long_gsm,
        ),
        ("emoji, 4 parts UCS-2", &ucs2),
    ] {
        g.throughput(Throughput::Bytes(text.len() as u64));
        g.bench_function(name, |b| {
            b.iter(|| black_box(encode_submit(&number, black_box(text), 7, opts).map(|p| p.len())))
        });
    }
    g.finish();

    let mut g = c.benchmark_group("decode_submit");
    for (name, text) in [("OTP, GSM 7-bit", &otp), ("emoji part, UCS-2", &ucs2)] {
        let parts = encode_submit(&number, text, 7, opts).expect("encodable");
        let hex = parts[0].hex.clone();
        g.throughput(Throughput::Bytes(hex.len() as u64));
        g.bench_function(name, |b| {
            b.iter(|| black_box(decode_submit(black_box(&hex)).is_ok()))
        });
    }
    g.finish();
}

criterion_group!(benches, encoding);
criterion_main!(benches);
