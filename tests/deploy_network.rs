//! `deploy/nftables/` and `deploy/sysctl.d/`: the firewall table loads with Debian's `nft` and
//! drops what it says it drops, and the kernel settings apply, each in a network namespace of
//! the test's own (`unshare --net`), so the host's firewall and settings are never touched.
//! `nft` comes from the README's setup step (Debian's `nftables`); the test needs root, as
//! the setup step does.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

const NFT: &str = include_str!("../deploy/nftables/icp-gate.nft");
const SYSCTL: &str = include_str!("../deploy/sysctl.d/60-icp-gate.conf");
const CONFIG: &str = include_str!("../deploy/icp-gate.toml");
const OPERATIONS: &str = include_str!("../docs/operations.md");

fn shipped(path: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(path)
}

/// `script` under bash in a new, empty network namespace with its loopback up.
fn in_own_netns(script: &str) -> Output {
    let out = Command::new("unshare")
        .args(["--net", "bash", "-euo", "pipefail", "-c"])
        .arg(format!("ip link set lo up\n{script}"))
        .output()
        .expect("unshare (util-linux)");
    assert!(
        out.status.success(),
        "{script}\n{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// The production config's mainland route prefixes.
fn mainland_prefixes() -> Vec<String> {
    let config: toml::Table = toml::from_str(CONFIG).unwrap();
    config["route"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|r| r["mainland"].as_bool() == Some(true))
        .map(|r| r["dst"].as_str().unwrap().to_string())
        .collect()
}

/// The elements the file puts in `set`, as written.
fn elements(set: &str) -> Vec<String> {
    let body = NFT
        .split_once(&format!("set {set} {{"))
        .unwrap_or_else(|| panic!("no set {set}"))
        .1
        .split_once('}')
        .unwrap()
        .0;
    body.lines()
        .map(str::trim)
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| l.strip_prefix("elements = {"))
        .flat_map(|l| l.trim_end_matches('}').split(','))
        .map(|e| e.trim().to_string())
        .filter(|e| !e.is_empty())
        .collect()
}

#[test]
fn nftables_table_loads_and_drops_udp_to_enforced_addresses_only() {
    let version = Command::new("nft").arg("--version").output();
    assert!(
        version.is_ok_and(|o| o.status.success()),
        "nft not found: install Debian's nftables package (see the README's setup step)"
    );
    // The shipped file as it is: what an operator runs before loading it.
    let file = shipped("deploy/nftables/icp-gate.nft");
    in_own_netns(&format!("nft -c -f {}", file.display()));

    // It enforces what the shipped config enforces.
    assert_eq!(elements("enforced_v4"), mainland_prefixes());
    assert!(elements("enforced_v6").is_empty());
    assert!(elements("udp_passed").is_empty());

    // Loaded for real, with a loopback address in place of the documentation prefix, then
    // changed at run time with the commands the file documents.
    for command in [
        "nft add element inet icp_gate enforced_v4 '{ 198.51.100.0/24 }'",
        "nft delete element inet icp_gate enforced_v4 '{ 198.51.100.0/24 }'",
        "nft list chain inet icp_gate prerouting",
        "nft delete table inet icp_gate",
    ] {
        assert!(
            NFT.contains(command),
            "the file no longer documents {command}"
        );
    }
    let dir = tempfile::tempdir().unwrap();
    let test_copy = dir.path().join("icp-gate.nft");
    std::fs::write(&test_copy, NFT.replace("203.0.113.0/24", "127.0.0.2/32")).unwrap();
    let t = test_copy.display();
    let out = in_own_netns(&format!(
        r#"
nft -f {t}
nft -f {t}   # loading it again replaces the table
nft add element inet icp_gate enforced_v4 '{{ 127.0.0.4/32 }}'
nft add element inet icp_gate enforced_v6 '{{ 2001:db8::/32 }}'
nft add element inet icp_gate udp_passed '{{ 53 }}'
udp() {{ echo datagram > /dev/udp/$1/$2; }}
udp 127.0.0.2 443       # QUIC to an enforced address: dropped
udp 127.0.0.2 8443      # on any port an Alt-Svc may name: dropped
udp 127.0.0.4 443       # an address added at run time: dropped
udp 127.0.0.2 53        # a passed port: not dropped
udp 127.0.0.3 443       # not enforced: not dropped
(exec 3<>/dev/tcp/127.0.0.2/443) 2>/dev/null || true   # TCP: not this table's business
nft list table inet icp_gate
nft delete table inet icp_gate
! nft list table inet icp_gate 2>/dev/null
"#
    ));
    let listing = String::from_utf8(out.stdout).unwrap();
    let counters: Vec<&str> = listing
        .lines()
        .map(str::trim)
        .filter(|l| l.contains("counter"))
        .collect();
    assert_eq!(
        counters.len(),
        2,
        "one drop rule per family, once:\n{listing}"
    );
    assert!(
        counters[0].starts_with("ip daddr @enforced_v4")
            && counters[0].contains("counter packets 3 ")
            && counters[0].ends_with(" drop"),
        "{listing}"
    );
    assert!(counters[1].contains("counter packets 0 "), "{listing}");
}

/// `key = value` settings of the sysctl file, in order.
fn settings() -> Vec<(&'static str, &'static str)> {
    SYSCTL
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#') && !l.starts_with(';'))
        .map(|l| {
            let (k, v) = l
                .split_once('=')
                .unwrap_or_else(|| panic!("not key = value: {l}"));
            (k.trim(), v.trim())
        })
        .collect()
}

#[test]
fn sysctl_settings_parse_and_apply() {
    let settings = settings();
    assert!(!settings.is_empty());
    for (key, _) in &settings {
        let proc = Path::new("/proc/sys").join(key.replace('.', "/"));
        assert!(proc.exists(), "{key}: no {}", proc.display());
        // Per network namespace: a container with its own network can set them, and applying
        // them here cannot touch the host.
        assert!(key.starts_with("net."), "{key}");
    }
    let value = |key: &str| {
        settings
            .iter()
            .find(|(k, _)| *k == key)
            .unwrap_or_else(|| panic!("{key} not set"))
            .1
    };
    // What docs/operations.md recommends, and what the shipped config needs.
    let range = value("net.ipv4.ip_local_port_range");
    assert!(
        OPERATIONS.contains(&format!("net.ipv4.ip_local_port_range=\"{range}\"")),
        "docs/operations.md recommends another range than {range}"
    );
    let config: toml::Table = toml::from_str(CONFIG).unwrap();
    let admin = config["admin"]["bind"].as_str().unwrap();
    let admin_port = admin.rsplit(':').next().unwrap();
    assert_eq!(value("net.ipv4.ip_local_reserved_ports"), admin_port);
    assert!(value("net.core.somaxconn").parse::<u32>().unwrap() >= 4096);

    // sysctl(8) takes the file as written, and the kernel then reads the same values back.
    let keys: Vec<&str> = settings.iter().map(|(k, _)| *k).collect();
    let out = in_own_netns(&format!(
        "sysctl -q -p {} && sysctl -n {}",
        shipped("deploy/sysctl.d/60-icp-gate.conf").display(),
        keys.join(" ")
    ));
    let read: Vec<String> = String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(|l| l.split_whitespace().collect::<Vec<_>>().join(" "))
        .collect();
    let written: Vec<&str> = settings.iter().map(|(_, v)| *v).collect();
    assert_eq!(read, written);
}
