//! Per-request cost of the decision: normalise the Host, then decide (route, public suffix list,
//! longest-match lookup), at 1 000 and 10 000 000 registry entries, with the Host rotating over
//! 100 000 names so the registry does not sit in cache.
//!
//! Side by side, the same longest-match walk over a plain `HashMap<String, Entry>` (the obvious
//! alternative) shows what the packed snapshot costs or saves per lookup.
//!
//! `ICP_GATE_BENCH_SIZES=1000,1000000` overrides the sizes, `ICP_GATE_BENCH_ROTATION` the number
//! of names (at 1 000 000 and more the registry's lines no longer fit in this machine's 32 MiB
//! cache, as under load, where the kernel's network stack shares it).

use std::collections::HashMap;
use std::hint::black_box;
use std::net::IpAddr;

use criterion::{BenchmarkId, Criterion, criterion_group, criterion_main};
use icp_gate::config::{Action, Mode, Origin, PolicyConfig, RouteConfig};
use icp_gate::core::decision::{HostInput, Policy, decide};
use icp_gate::core::routes::RouteTable;
use icp_gate::registry::{Entry, SnapshotBuilder, Status};
use icp_gate::wire::host::{self, Host};

fn rotation() -> usize {
    std::env::var("ICP_GATE_BENCH_ROTATION")
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(100_000)
}

fn sizes() -> Vec<usize> {
    std::env::var("ICP_GATE_BENCH_SIZES")
        .ok()
        .map(|s| s.split(',').filter_map(|n| n.trim().parse().ok()).collect())
        .unwrap_or_else(|| vec![1_000, 10_000_000])
}

fn entry(i: usize) -> Entry {
    Entry {
        domain: format!("d{i:08}.com.cn"),
        icp: format!("京ICP备{i:08}号-1"),
        status: Status::Filed,
        access_here: i % 10 != 0,
    }
}

fn policy() -> Policy {
    let route = RouteConfig {
        dst: "10.0.0.0/8".parse().unwrap(),
        mainland: true,
        x_forwarded_for: true,
        send_proxy_protocol: None,
        mode: None,
        require_access_here: true,
        http_origin: Origin::parse("127.0.0.1:80"),
        tls_origin: None,
        quic_origin: None,
    };
    Policy::new(
        RouteTable::new(vec![route]),
        &PolicyConfig {
            mode: Mode::Enforce,
            ip_literal: Action::Allow,
            no_sni: Action::Block,
            exempt: vec![],
        },
    )
}

/// Host headers as clients send them: mostly `www.` sub-domains of filed names (two lookups),
/// some unfiled names, some with a port or upper case.
fn hosts(n: usize) -> Vec<String> {
    (0..rotation())
        .map(|k| {
            let i = (k * 7919) % n.max(1);
            match k % 10 {
                0 => format!("unfiled{k}.com.cn"),
                1 => format!("WWW.D{i:08}.COM.CN:443"),
                2 => format!("d{i:08}.com.cn"),
                _ => format!("www.d{i:08}.com.cn"),
            }
        })
        .collect()
}

fn bench(c: &mut Criterion) {
    let policy = policy();
    let dst: IpAddr = "10.1.2.3".parse().unwrap();
    let mut group = c.benchmark_group("normalise_and_decide");
    for n in sizes() {
        let mut builder = SnapshotBuilder::new();
        let mut plain: HashMap<String, Entry> = HashMap::with_capacity(n);
        for i in 0..n {
            let e = entry(i);
            builder.push_entry(&e).unwrap();
            plain.insert(e.domain.clone(), e);
        }
        let snapshot = builder.finish(1);
        let hosts = hosts(n);

        let mut k = 0;
        group.bench_function(BenchmarkId::new("icp_gate_snapshot", n), |b| {
            b.iter(|| {
                k = (k + 1) % hosts.len();
                let host = host::parse_authority(black_box(hosts[k].as_bytes()));
                let input = match &host {
                    Ok(Host::Name(name)) => HostInput::Name(name),
                    Ok(Host::Ip(ip)) => HostInput::Ip(*ip),
                    Err(_) => HostInput::Invalid,
                };
                decide(dst, input, &snapshot, &policy).decision
            })
        });

        let mut k = 0;
        group.bench_function(BenchmarkId::new("std_hashmap_same_walk", n), |b| {
            b.iter(|| {
                k = (k + 1) % hosts.len();
                let host = host::parse_authority(black_box(hosts[k].as_bytes())).unwrap();
                let name = host.to_text();
                let registrable = host::registrable_domain(&name).unwrap_or(&name);
                let mut candidate: &str = &name;
                loop {
                    if let Some(e) = plain.get(candidate) {
                        break e.allows();
                    }
                    if candidate.len() <= registrable.len() {
                        break false;
                    }
                    candidate = candidate.split_once('.').map_or("", |(_, rest)| rest);
                }
            })
        });

        let names: Vec<String> = hosts
            .iter()
            .map(|h| {
                host::parse_authority(h.as_bytes())
                    .unwrap()
                    .to_text()
                    .into_owned()
            })
            .collect();
        let mut k = 0;
        group.bench_function(BenchmarkId::new("registrable_domain_only", n), |b| {
            b.iter(|| {
                k = (k + 1) % names.len();
                host::registrable_domain(black_box(&names[k])).is_some()
            })
        });

        // The floor: fetching the rotating input itself (a cache miss on most iterations).
        let mut k = 0;
        group.bench_function(BenchmarkId::new("input_only", n), |b| {
            b.iter(|| {
                k = (k + 1) % hosts.len();
                black_box(hosts[k].as_bytes())
                    .iter()
                    .map(|&b| b as u32)
                    .sum::<u32>()
            })
        });

        let mut k = 0;
        group.bench_function(BenchmarkId::new("normalise_only", n), |b| {
            b.iter(|| {
                k = (k + 1) % hosts.len();
                host::parse_authority(black_box(hosts[k].as_bytes())).is_ok()
            })
        });
    }
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
