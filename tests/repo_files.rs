//! Files a user of the repository reads before the code: the licence matches what `Cargo.toml`
//! declares, and the changelog keeps its format.

const CARGO_TOML: &str = include_str!("../Cargo.toml");
const LICENSE: &str = include_str!("../LICENSE");
const CHANGELOG: &str = include_str!("../CHANGELOG.md");

#[test]
fn license_file_is_the_full_text_of_the_declared_license() {
    let declared = CARGO_TOML
        .lines()
        .find_map(|l| l.strip_prefix("license = "))
        .expect("a license key in Cargo.toml");
    assert_eq!(declared, "\"Apache-2.0\"");
    let words: Vec<&str> = LICENSE.split_whitespace().collect();
    assert_eq!(
        words[..5],
        ["Apache", "License", "Version", "2.0,", "January"],
        "LICENSE must be the Apache License 2.0"
    );
    // The whole text, not a pointer to it: every one of the nine sections and the appendix.
    for section in [
        "1. Definitions.",
        "2. Grant of Copyright License.",
        "3. Grant of Patent License.",
        "4. Redistribution.",
        "5. Submission of Contributions.",
        "6. Trademarks.",
        "7. Disclaimer of Warranty.",
        "8. Limitation of Liability.",
        "9. Accepting Warranty or Additional Liability.",
        "END OF TERMS AND CONDITIONS",
        "APPENDIX: How to apply the Apache License to your work.",
    ] {
        assert!(LICENSE.contains(section), "LICENSE lacks {section:?}");
    }
    assert!(words.len() > 1500, "{} words", words.len());
}

#[test]
fn changelog_keeps_a_changelog_with_an_unreleased_section() {
    assert!(CHANGELOG.starts_with("# Changelog\n"));
    assert!(CHANGELOG.contains("keepachangelog.com"));
    let sections: Vec<&str> = CHANGELOG
        .lines()
        .filter_map(|l| l.strip_prefix("## "))
        .collect();
    assert_eq!(sections.first(), Some(&"[Unreleased]"), "{sections:?}");
    // Only Keep a Changelog's own headings inside a release.
    for heading in CHANGELOG.lines().filter_map(|l| l.strip_prefix("### ")) {
        assert!(
            [
                "Added",
                "Changed",
                "Deprecated",
                "Removed",
                "Fixed",
                "Security"
            ]
            .contains(&heading),
            "unexpected heading {heading:?}"
        );
    }
    // The version Cargo.toml names has its section.
    let version = CARGO_TOML
        .lines()
        .find_map(|l| l.strip_prefix("version = \""))
        .and_then(|v| v.strip_suffix('"'))
        .unwrap();
    assert!(
        sections.iter().any(|s| s.starts_with(version)),
        "no section for {version}: {sections:?}"
    );
}
