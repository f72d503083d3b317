//! `icp-gate completions SHELL` and `icp-gate man`, run through the real shells and `man`: the
//! scripts load and complete the subcommands, the pages render without warnings. bash, zsh,
//! fish and man-db come from the README's setup step (`.ci/run` installs them too).

mod common;

use std::process::{Command, Output, Stdio};

use common::process::BIN;

const SUBCOMMANDS: [&str; 5] = ["run", "check", "explain", "completions", "man"];

fn output(command: &mut Command) -> Output {
    let program = format!("{command:?}");
    let out = command
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("{program}: {e} (installed by the README's setup step)"));
    assert!(
        out.status.success(),
        "{program}: {}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

fn icp_gate(args: &[&str]) -> String {
    String::from_utf8(output(Command::new(BIN).args(args)).stdout).unwrap()
}

fn script(shell: &str) -> tempfile::NamedTempFile {
    let text = icp_gate(&["completions", shell]);
    assert!(!text.is_empty());
    let file = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(file.path(), text).unwrap();
    file
}

#[test]
fn bash_completes_subcommands_and_their_options() {
    let file = script("bash");
    let complete = |words: &str| {
        let program = format!(
            "set -e; source {}; COMP_WORDS=({words}); COMP_CWORD=$((${{#COMP_WORDS[@]}} - 1)); \
             function=$(complete -p icp-gate | sed -E 's/.* -F ([^ ]+) .*/\\1/'); \
             \"$function\" icp-gate \"${{COMP_WORDS[COMP_CWORD]}}\" \"${{COMP_WORDS[COMP_CWORD-1]}}\"; \
             printf '%s\\n' \"${{COMPREPLY[@]}}\"",
            file.path().display()
        );
        let out = output(Command::new("bash").args(["--norc", "-c", &program]));
        String::from_utf8(out.stdout).unwrap()
    };
    let all = complete("icp-gate ''");
    for sub in SUBCOMMANDS {
        assert!(all.lines().any(|l| l == sub), "{sub} not offered: {all}");
    }
    assert_eq!(complete("icp-gate ex").trim(), "explain");
    let options = complete("icp-gate run --");
    for option in ["--config", "--log-format", "--threads", "--runtime"] {
        assert!(options.lines().any(|l| l == option), "{option}: {options}");
    }
    let shells = complete("icp-gate completions ''");
    for shell in ["bash", "zsh", "fish"] {
        assert!(shells.lines().any(|l| l == shell), "{shell}: {shells}");
    }
}

#[test]
fn fish_completes_subcommands() {
    let file = script("fish");
    let out = output(Command::new("fish").args([
        "--no-config",
        "-c",
        &format!("source {}; complete -C 'icp-gate '", file.path().display()),
    ]));
    let offered: Vec<String> = String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(|l| l.split('\t').next().unwrap().to_string())
        .collect();
    for sub in SUBCOMMANDS {
        assert!(offered.iter().any(|o| o == sub), "{sub}: {offered:?}");
    }
}

#[test]
fn zsh_loads_the_completion_function() {
    let file = script("zsh");
    let text = std::fs::read_to_string(file.path()).unwrap();
    assert!(text.starts_with("#compdef icp-gate"), "{text}");
    // Parses, and defines the function compinit would autoload.
    output(Command::new("zsh").args(["-n"]).arg(file.path()));
    let out = output(Command::new("zsh").args([
        "-f",
        "-c",
        &format!(
            "autoload -U compinit; compinit -u -D; source {}; whence -w _icp-gate",
            file.path().display()
        ),
    ]));
    assert_eq!(
        String::from_utf8(out.stdout).unwrap().trim(),
        "_icp-gate: function"
    );
}

#[test]
fn man_pages_render_without_warnings() {
    let page = icp_gate(&["man"]);
    assert!(page.contains(".TH icp-gate 1"), "{page}");
    let dir = tempfile::tempdir().unwrap();
    let out = icp_gate(&["man", "--out-dir", dir.path().to_str().unwrap()]);
    assert!(out.is_empty(), "{out}");
    let mut names: Vec<String> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    names.sort();
    let mut expected: Vec<String> = SUBCOMMANDS
        .iter()
        .map(|s| format!("icp-gate-{s}.1"))
        .chain(["icp-gate.1".to_string()])
        .collect();
    expected.sort();
    assert_eq!(names, expected);
    assert_eq!(
        std::fs::read_to_string(dir.path().join("icp-gate.1")).unwrap(),
        page,
        "the printed page is the written one"
    );

    for name in &names {
        let out = output(
            Command::new("man")
                .args(["--warnings", "-l"])
                .arg(dir.path().join(name))
                .env("MANWIDTH", "100")
                .env("MAN_KEEP_FORMATTING", "0")
                .env("PAGER", "cat"),
        );
        let text = plain(out.stdout);
        let warnings = String::from_utf8(out.stderr).unwrap();
        assert!(warnings.trim().is_empty(), "{name}: {warnings}");
        assert!(text.contains("SYNOPSIS"), "{name}: {text}");
    }
    let explain = output(
        Command::new("man")
            .args(["-l"])
            .arg(dir.path().join("icp-gate-explain.1"))
            .env("MANWIDTH", "200")
            .env("PAGER", "cat"),
    );
    let text = plain(explain.stdout);
    assert!(
        text.contains("Required when the config has more than one route"),
        "{text}"
    );
    assert!(text.contains("--config"), "{text}");
}

/// `man`'s output without the overstrike (`N\x08N`) it uses for bold when not on a terminal.
fn plain(bytes: Vec<u8>) -> String {
    let mut out: Vec<char> = Vec::new();
    for c in String::from_utf8(bytes).unwrap().chars() {
        if c == '\u{8}' {
            out.pop();
        } else {
            out.push(c);
        }
    }
    out.into_iter().collect()
}
