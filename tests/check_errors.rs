//! The real binary's `check` and `explain` on configs an operator gets subtly wrong: each error
//! names the file and the key, and `explain` never guesses a destination between routes.

mod common;

use std::path::Path;
use std::process::{Command, Output};

use common::process::{BIN, write_config};

fn icp_gate(args: &[&str], config: &Path) -> Output {
    let (command, rest) = args.split_first().unwrap();
    Command::new(BIN)
        .arg(command)
        .arg("--config")
        .arg(config)
        .args(rest)
        .output()
        .unwrap()
}

/// `check` fails with exit 1, and its one error starts with `icp-gate: FILE: KEY: `.
fn check_fails(config: &Path, key: &str) -> String {
    let out = icp_gate(&["check"], config);
    let err = String::from_utf8(out.stderr).unwrap();
    assert_eq!(out.status.code(), Some(1), "{err}");
    let prefix = format!("icp-gate: {}: {key}: ", config.display());
    assert!(err.starts_with(&prefix), "expected {prefix:?}, got {err}");
    assert_eq!(err.lines().count(), 1, "{err}");
    err
}

fn origin() -> std::net::SocketAddr {
    "127.0.0.1:9".parse().unwrap()
}

#[test]
fn exempting_a_whole_public_suffix_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    for suffix in ["cn", "com.cn"] {
        let config = write_config(dir.path(), origin(), "");
        let text = std::fs::read_to_string(&config).unwrap().replace(
            "exempt = [\"console.example\"]",
            &format!("exempt = [\"console.example\", \"{suffix}\"]"),
        );
        std::fs::write(&config, text).unwrap();
        let err = check_fails(&config, "policy.exempt[1]");
        assert!(
            err.contains(&format!("\"{suffix}\" is a public suffix")),
            "{err}"
        );
    }
}

#[test]
fn a_template_with_an_unknown_placeholder_or_no_content_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(
        dir.path(),
        origin(),
        "[block_page]\ntemplate = \"block.html\"\n",
    );
    let template = dir.path().join("block.html");

    std::fs::write(&template, "<h1>{reason_zh}</h1>\n<p>{hots} 未备案</p>\n").unwrap();
    let err = check_fails(&config, "block_page.template");
    assert!(
        err.contains(&format!(
            "{} line 2: unknown placeholder {{hots}}",
            template.display()
        )),
        "{err}"
    );
    assert!(err.contains("did you mean {host}?"), "{err}");

    std::fs::write(&template, "").unwrap();
    let err = check_fails(&config, "block_page.template");
    assert!(err.contains("is empty"), "{err}");

    // The shipped page, with CSS braces, passes.
    std::fs::copy(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("config/block.html"),
        &template,
    )
    .unwrap();
    let out = icp_gate(&["check"], &config);
    assert!(out.status.success(), "{out:?}");
}

#[test]
fn explain_without_dst_names_its_assumption_or_asks_for_one() {
    let dir = tempfile::tempdir().unwrap();
    // One route: its network address, said to be assumed.
    let config = write_config(dir.path(), origin(), "");
    let out = icp_gate(&["explain", "www.filed.cn"], &config);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{out:?}");
    assert!(
        text.contains(
            "destination: 127.0.0.1 (assumed: the only route's network address; --dst names another)"
        ),
        "{text}"
    );
    assert!(text.contains("reason:      filed"), "{text}");

    // Two routes: the destination decides which applies, so it must be given.
    let two = write_config(
        dir.path(),
        origin(),
        "[[route]]\ndst = \"10.9.0.0/16\"\nmainland = false\nhttp_origin = \"127.0.0.1:9\"\n",
    );
    let out = icp_gate(&["explain", "www.filed.cn"], &two);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.starts_with(&format!("icp-gate: {}: --dst is required", two.display())),
        "{err}"
    );
    assert!(
        err.contains("2 routes (127.0.0.1/32, 10.9.0.0/16)"),
        "{err}"
    );
    assert!(out.stdout.is_empty());

    let out = icp_gate(&["explain", "www.filed.cn", "--dst", "10.9.1.1"], &two);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{out:?}");
    assert!(text.contains("destination: 10.9.1.1\n"), "{text}");
    assert!(text.contains("reason:      non_mainland"), "{text}");
}
