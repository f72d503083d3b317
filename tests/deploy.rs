//! The shipped deployment (`deploy/`): the systemd unit, its service user and the production
//! config, checked against each other, by systemd's own analyser, and by running the real binary
//! the way the unit runs it — as an unprivileged user holding only `CAP_NET_BIND_SERVICE`.

mod common;

use std::net::{Ipv4Addr, SocketAddr, TcpListener};
use std::os::unix::fs::{PermissionsExt, chown};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use common::process::{BIN, Proc};
use common::{Origin, http1, raw, testdata};
use icp_gate::config::Config;

const UNIT: &str = include_str!("../deploy/icp-gate.service");
const CONFIG: &str = include_str!("../deploy/icp-gate.toml");
const SYSUSERS: &str = include_str!("../deploy/icp-gate.sysusers");
const RULES: &str = include_str!("../deploy/prometheus/icp-gate.rules.yml");

/// Where docs/operations.md installs the binary and the config, as the unit names them.
const INSTALLED_BIN: &str = "/usr/local/bin/icp-gate";
const INSTALLED_CONFIG: &str = "/etc/icp-gate/icp-gate.toml";
const CONFIG_DIR: &str = "/etc/icp-gate";

/// `nobody` / `nogroup`: stands in for the service user, which only exists once installed.
const NOBODY: u32 = 65534;

/// The values of `key` in the unit's `[Service]` section, in order (systemd allows repeats).
fn service(key: &str) -> Vec<&'static str> {
    let mut section = "";
    let mut values = Vec::new();
    for line in UNIT.lines().map(str::trim) {
        if line.is_empty() || line.starts_with('#') || line.starts_with(';') {
            continue;
        }
        if line.starts_with('[') {
            section = line;
            continue;
        }
        if section == "[Service]"
            && let Some((k, v)) = line.split_once('=')
            && k.trim() == key
        {
            values.push(v.trim());
        }
    }
    values
}

fn one(key: &str) -> &'static str {
    match service(key).as_slice() {
        [value] => value,
        other => panic!("[Service] {key}= should be set once, is {other:?}"),
    }
}

fn argv(line: &str) -> Vec<&str> {
    line.split_whitespace().collect()
}

/// An `icp-gate` command line of the unit, run here: the installed paths become the test
/// binary and `config`.
fn unit_command(line: &str, config: &Path) -> Vec<String> {
    let argv = argv(line);
    assert_eq!(argv[0], INSTALLED_BIN, "{line}");
    let mut out = vec![BIN.to_string()];
    out.extend(argv[1..].iter().map(|arg| match *arg {
        INSTALLED_CONFIG => config.display().to_string(),
        other => other.to_string(),
    }));
    out
}

/// Runs `command` and returns its standard error; fails the test, showing both outputs, if
/// it does not exit 0.
fn succeeds(command: &mut Command) -> String {
    let out = command.output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(
        out.status.success(),
        "{command:?}: {}{stderr}",
        String::from_utf8_lossy(&out.stdout)
    );
    stderr
}

fn seconds(value: &str) -> u64 {
    let digits = value.strip_suffix('s').unwrap_or(value);
    digits
        .parse()
        .unwrap_or_else(|_| panic!("not whole seconds: {value}"))
}

/// The production config with its files under `etc` (admin token written there) instead of
/// /etc/icp-gate, and loaded by the library, so the test reads it as the binary does.
fn load_config(etc: &Path) -> Config {
    std::fs::write(etc.join("admin.token"), "deploy-test-token\n").unwrap();
    let path = etc.join("icp-gate.toml");
    std::fs::write(
        &path,
        CONFIG.replace(CONFIG_DIR, &etc.display().to_string()),
    )
    .unwrap();
    Config::load(&path).unwrap_or_else(|e| panic!("deploy/icp-gate.toml: {e}"))
}

#[test]
fn unit_config_and_service_user_agree() {
    let dir = tempfile::tempdir().unwrap();
    let config = load_config(dir.path());

    // The user systemd-sysusers creates is the one the unit runs as.
    let user = SYSUSERS
        .lines()
        .find_map(|l| l.strip_prefix("u "))
        .and_then(|l| l.split_whitespace().next())
        .expect("a `u` line in deploy/icp-gate.sysusers");
    assert_eq!(one("User"), user);
    assert_eq!(one("Group"), user);

    // Start, reload and stop run the commands docs/operations.md documents, on the installed config.
    let check = [INSTALLED_BIN, "check", "--config", INSTALLED_CONFIG];
    assert_eq!(argv(one("ExecStartPre")), check);
    assert_eq!(
        argv(one("ExecStart"))[..4],
        [INSTALLED_BIN, "run", "--config", INSTALLED_CONFIG]
    );
    let reload = service("ExecReload");
    assert_eq!(reload.len(), 2, "{reload:?}");
    assert_eq!(
        argv(reload[0]),
        check,
        "a bad config fails `systemctl reload`"
    );
    assert_eq!(argv(reload[1]), ["/bin/kill", "-s", "HUP", "$MAINPID"]);
    assert_eq!(one("KillSignal"), "SIGTERM");

    // The drain ends before systemd's SIGKILL.
    let stop = Duration::from_secs(seconds(one("TimeoutStopSec")));
    assert!(
        stop > config.limits.drain_timeout,
        "TimeoutStopSec {stop:?} must exceed limits.drain_timeout {:?}",
        config.limits.drain_timeout
    );

    // Two descriptors per proxied connection (client and origin).
    let nofile: usize = one("LimitNOFILE").parse().unwrap();
    assert!(
        nofile >= 2 * config.limits.max_connections,
        "LimitNOFILE {nofile} < 2 × limits.max_connections {}",
        config.limits.max_connections
    );

    // The registry lives in the only directory the unit lets the service write.
    let state = Path::new("/var/lib").join(one("StateDirectory"));
    assert!(
        config.registry.state_dir.starts_with(&state),
        "registry.state_dir {} is outside the unit's StateDirectory {}",
        config.registry.state_dir.display(),
        state.display()
    );
    assert_eq!(Path::new(one("WorkingDirectory")), state);
    assert_eq!(one("ProtectSystem"), "strict");

    // Listening below 1024 as a plain user takes exactly this capability.
    assert!(config.listeners.iter().any(|l| l.bind.port() < 1024));
    assert_eq!(one("AmbientCapabilities"), "CAP_NET_BIND_SERVICE");
    assert_eq!(one("CapabilityBoundingSet"), "CAP_NET_BIND_SERVICE");

    // Files the config reads are under the config directory docs/operations.md installs.
    let admin = config.admin.as_ref().expect("an [admin] section");
    let token = admin.token_file.as_deref();
    assert!(
        token.is_some_and(|t| t.starts_with(dir.path())),
        "{token:?}"
    );
    assert!(config.demo_origin.is_none(), "no demo origin in production");
}

#[test]
fn unit_and_service_user_pass_systemds_own_tools() {
    // systemd-analyze and systemd-sysusers come with Debian's systemd package, which the
    // README's setup step and .ci/run install; without them this fails and says so.
    assert!(
        Command::new("systemd-analyze")
            .arg("--version")
            .output()
            .is_ok(),
        "systemd-analyze not found: install Debian's systemd package (see the README's setup step)"
    );
    let dir = tempfile::tempdir().unwrap();
    let unit = dir.path().join("icp-gate.service");
    std::fs::write(&unit, UNIT.replace(INSTALLED_BIN, BIN)).unwrap();

    let stderr = succeeds(Command::new("systemd-analyze").arg("verify").arg(&unit));
    assert!(stderr.trim().is_empty(), "warnings: {stderr}");

    // Exposure at most 2.0 of 10 ("OK"): the sandbox options are in effect, not misspelt.
    succeeds(
        Command::new("systemd-analyze")
            .args(["security", "--offline=true", "--threshold=20"])
            .arg(&unit),
    );

    // The service user, created in an empty root as systemd-sysusers would at install.
    let root = dir.path().join("root");
    std::fs::create_dir_all(root.join("etc")).unwrap();
    let sysusers = dir.path().join("icp-gate.conf");
    std::fs::write(&sysusers, SYSUSERS).unwrap();
    succeeds(
        Command::new("systemd-sysusers")
            .arg(format!("--root={}", root.display()))
            .arg(&sysusers),
    );
    let passwd = std::fs::read_to_string(root.join("etc/passwd")).unwrap();
    let fields: Vec<&str> = passwd.trim().split(':').collect();
    assert_eq!(fields[0], one("User"), "{passwd}");
    assert_eq!(
        fields[5..],
        ["/var/lib/icp-gate", "/usr/sbin/nologin"],
        "{passwd}"
    );
}

/// A free port below 1024 on 127.0.0.1 (only root can check by binding it).
fn privileged_port(not: u16) -> u16 {
    let start = 600 + (std::process::id() % 300) as u16;
    (start..1024)
        .chain(600..start)
        .find(|&port| port != not && TcpListener::bind((Ipv4Addr::LOCALHOST, port)).is_ok())
        .expect("a free port below 1024")
}

/// `line` of the unit, run as `nobody` holding `capabilities` (the unit's
/// `AmbientCapabilities=` value, or "" for none), the other privileges dropped as the unit does.
fn as_service_user(line: &str, config: &Path, capabilities: &str) -> Command {
    let caps: String = capabilities
        .split_whitespace()
        .map(|cap| format!(",+{}", cap.trim_start_matches("CAP_").to_lowercase()))
        .collect();
    let mut command = Command::new("setpriv");
    command
        .args([
            &format!("--reuid={NOBODY}"),
            &format!("--regid={NOBODY}"),
            "--clear-groups",
            "--no-new-privs",
            &format!("--inh-caps=-all{caps}"),
            &format!("--ambient-caps=-all{caps}"),
            &format!("--bounding-set=-all{caps}"),
            "--",
        ])
        .args(unit_command(line, config));
    command
}

fn chmod(path: &Path, mode: u32) {
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
}

/// The production config, its addresses moved to loopback and its route to test origins, in a
/// folder laid out like the installed one with the unit's ownership and modes.
struct Installed {
    _root: tempfile::TempDir,
    config: PathBuf,
    state: PathBuf,
    http: SocketAddr,
    tls: SocketAddr,
}

fn install(http_origin: SocketAddr, tls_origin: SocketAddr) -> Installed {
    let root = tempfile::tempdir().unwrap();
    let etc = root.path().join("etc");
    let state = root.path().join("state");
    std::fs::create_dir(&etc).unwrap();
    std::fs::create_dir(&state).unwrap();
    chmod(root.path(), 0o755);
    chmod(&etc, 0o755);
    // StateDirectory=icp-gate, StateDirectoryMode=0750: owned by the service user.
    chown(&state, Some(NOBODY), Some(NOBODY)).unwrap();
    chmod(&state, 0o750);
    // The token: readable by the service's group only.
    let token = etc.join("admin.token");
    std::fs::write(&token, "deploy-test-token\n").unwrap();
    chown(&token, Some(0), Some(NOBODY)).unwrap();
    chmod(&token, 0o640);

    let http_port = privileged_port(0);
    let tls_port = privileged_port(http_port);
    let http = SocketAddr::from((Ipv4Addr::LOCALHOST, http_port));
    let tls = SocketAddr::from((Ipv4Addr::LOCALHOST, tls_port));
    let text = CONFIG
        .replace(CONFIG_DIR, &etc.display().to_string())
        .replace("/var/lib/icp-gate", &state.display().to_string())
        .replace("0.0.0.0:80\"", &format!("{http}\""))
        .replace("0.0.0.0:443\"", &format!("{tls}\""))
        .replace("127.0.0.1:9090", "127.0.0.1:0")
        .replace("203.0.113.0/24", "127.0.0.0/8")
        .replace("10.0.0.10:80\"", &format!("{http_origin}\""))
        .replace("10.0.0.10:443\"", &format!("{tls_origin}\""));
    let settings = text.lines().filter(|l| !l.trim_start().starts_with('#'));
    for line in settings {
        for production in [
            "0.0.0.0",
            "9090",
            "203.0.113.",
            "10.0.0.10",
            "\"/etc/",
            "\"/var/lib",
        ] {
            assert!(!line.contains(production), "not moved to the test: {line}");
        }
    }
    let config = etc.join("icp-gate.toml");
    std::fs::write(&config, text).unwrap();
    chmod(&config, 0o644);
    Installed {
        _root: root,
        config,
        state,
        http,
        tls,
    }
}

fn is_root() -> bool {
    // SAFETY: geteuid(2) has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn runs_as_the_unit_runs_it() {
    // The README's setup step and the tests run as root (CI does): switching to the service
    // user and granting it one capability take root, so without it this fails and says so.
    assert!(
        is_root(),
        "needs root to switch to the service user and grant CAP_NET_BIND_SERVICE"
    );
    let origin = Origin::start().await;
    let tls_origin = common::raw_origin(b"tls origin").await;
    let installed = install(origin.addr, tls_origin);
    let config = &installed.config;
    let caps = one("AmbientCapabilities");

    // ExecStartPre: the check passes as the service user.
    succeeds(&mut as_service_user(one("ExecStartPre"), config, caps));

    // Without the unit's capability the service cannot take its ports, and says which one.
    let denied = as_service_user(one("ExecStart"), config, "")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&denied.stderr);
    assert_eq!(denied.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains(&installed.http.to_string()) && stderr.contains("Permission denied"),
        "{stderr}"
    );

    // ExecStart with AmbientCapabilities=CAP_NET_BIND_SERVICE.
    let mut gate = Proc::spawn(as_service_user(one("ExecStart"), config, caps));
    let admin = gate.admin_addr();
    gate.wait_for("ready");
    let status = std::fs::read_to_string(format!("/proc/{}/status", gate.pid())).unwrap();
    assert!(
        status.contains(&format!("Uid:\t{NOBODY}\t{NOBODY}\t{NOBODY}\t{NOBODY}")),
        "{status}"
    );

    // A fresh install has no filings: everything is blocked.
    let filed = [("host", "www.filed-example.com.cn")];
    let (code, _, _) = http1(installed.http, "GET", "/", &filed, b"").await;
    assert_eq!(code, 403);
    let hello = std::fs::read(testdata("clienthello/chromium.bin")).unwrap();
    let answer = raw(installed.tls, &hello, Duration::from_secs(3)).await;
    assert_eq!(
        answer.as_bytes(),
        [0x15, 3, 3, 0, 2, 2, 49],
        "access_denied"
    );

    // The filing system pushes a filing; it is durable in the state directory, written by the
    // service user, and enforced at once on both listeners.
    let entry = r#"{"domain":"filed-example.com.cn","icp":"京ICP备12345678号-1","status":"filed","access_here":true}"#;
    let auth = [
        ("host", "admin"),
        ("authorization", "Bearer deploy-test-token"),
    ];
    let (code, _, body) = http1(
        admin,
        "PUT",
        "/v1/registry/entries/filed-example.com.cn",
        &auth,
        entry.as_bytes(),
    )
    .await;
    assert_eq!(code, 200, "{body}");
    let written = std::fs::read_dir(installed.state.join("registry")).unwrap();
    for file in written {
        let meta = file.unwrap().metadata().unwrap();
        assert_eq!(std::os::unix::fs::MetadataExt::uid(&meta), NOBODY);
    }
    let (code, _, body) = http1(installed.http, "GET", "/a", &filed, b"").await;
    assert_eq!(
        (code, body.as_str()),
        (200, "origin saw www.filed-example.com.cn/a")
    );
    let answer = raw(installed.tls, &hello, Duration::from_secs(1)).await;
    assert_eq!(answer, "tls origin");

    // ExecReload: the check, then SIGHUP; the service keeps its ports and serves.
    let reload = service("ExecReload");
    succeeds(&mut as_service_user(reload[0], config, caps));
    gate.signal(libc::SIGHUP);
    gate.wait_for("config reloaded");
    let (code, _, _) = http1(installed.http, "GET", "/b", &filed, b"").await;
    assert_eq!(code, 200);

    // KillSignal: drained and exited 0 well inside TimeoutStopSec.
    gate.signal(libc::SIGTERM);
    let stop = Duration::from_secs(seconds(one("TimeoutStopSec")));
    assert_eq!(gate.wait_exit(stop), Some(0));
}

/// The metric names the alert rules use: every `icp_gate_*` and `process_*` word of the file.
fn rule_metrics() -> std::collections::BTreeSet<&'static str> {
    RULES
        .split(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
        .filter(|w| w.starts_with("icp_gate_") || w.starts_with("process_"))
        .collect()
}

/// The shipped rules' own unit tests. promtool comes with Debian's `prometheus` package, which
/// the README's setup step and `.ci/run` install; without it this fails and says so.
#[test]
fn alert_rules_pass_their_promtool_unit_tests() {
    assert!(
        Command::new("promtool").arg("--version").output().is_ok(),
        "promtool not found: install Debian's prometheus package (see the README's setup step)"
    );
    let rules = Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/prometheus");
    for args in [
        ["check", "rules", "icp-gate.rules.yml"],
        ["test", "rules", "icp-gate.rules.test.yml"],
    ] {
        succeeds(Command::new("promtool").args(args).current_dir(&rules));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn alert_rules_use_metrics_the_binary_exports() {
    // A metric renamed in the code would leave its alert silently never firing: every name
    // the rules use must be in the real binary's /metrics once it has served a little.
    let origin = Origin::start().await;
    let dir = tempfile::tempdir().unwrap();
    // A block certificate, so that its expiry is exported too.
    let (_, _, cert, key) = common::pki::Pki::new().leaf(&["block.example"]);
    std::fs::write(dir.path().join("block.crt"), cert).unwrap();
    std::fs::write(dir.path().join("block.key"), key).unwrap();
    let tls = "[[listener]]\nname = \"tls\"\nbind = \"127.0.0.1:0\"\nkind = \"tls\"\n\
               [tls]\nblock_cert = \"block.crt\"\nblock_key = \"block.key\"\n";
    let config = common::process::write_config(dir.path(), origin.addr, tls);
    let text = std::fs::read_to_string(&config).unwrap().replace(
        "mainland = true\n",
        &format!("mainland = true\ntls_origin = \"{}\"\n", origin.addr),
    );
    std::fs::write(&config, text).unwrap();
    let mut gate = Proc::start(&config);
    let admin = gate.admin_addr();
    let mut listeners = std::collections::HashMap::new();
    for _ in 0..2 {
        let line = gate.wait_for("listening");
        let addr: SocketAddr = line["addr"].as_str().unwrap().parse().unwrap();
        listeners.insert(line["listener"].as_str().unwrap().to_string(), addr);
    }
    gate.wait_for("ready");
    for host in ["filed.cn", "unfiled.cn"] {
        http1(listeners["http"], "GET", "/", &[("host", host)], b"").await;
    }
    let hello = std::fs::read(testdata("clienthello/openssl.bin")).unwrap();
    raw(listeners["tls"], &hello, Duration::from_secs(2)).await;
    let auth = [("host", "admin"), ("authorization", "Bearer test-token")];
    let entry = r#"{"domain":"new.cn","icp":"京ICP备1号-1","status":"filed","access_here":true}"#;
    let (code, _, _) = http1(
        admin,
        "PUT",
        "/v1/registry/entries/new.cn",
        &auth,
        entry.as_bytes(),
    )
    .await;
    assert_eq!(code, 200);
    let (_, _, metrics) = http1(admin, "GET", "/metrics", &[("host", "admin")], b"").await;

    let names = rule_metrics();
    assert!(names.len() >= 8, "{names:?}");
    for name in names {
        assert!(
            metrics.lines().any(|l| l
                .strip_prefix(name)
                .is_some_and(|rest| rest.starts_with(['{', ' ']))),
            "the rules use {name}, which /metrics does not export:\n{metrics}"
        );
    }
}
