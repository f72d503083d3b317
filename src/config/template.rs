//! What a block-page template and `block_page.redirect` may say (docs/configuration.md#block-page-templates):
//! the placeholders the block page fills in, and the checks `check`, start-up and reload make so
//! that a typo (`{hots}`) or an empty file is the operator's error, not a visitor's page.

use std::path::Path;

/// The placeholder names, without braces. `proxy::block_page` fills exactly these (a unit test
/// there keeps the two lists equal).
pub(crate) const PLACEHOLDERS: [&str; 8] = [
    "host",
    "reason",
    "reason_zh",
    "reason_en",
    "advice_zh",
    "advice_en",
    "request_id",
    "time",
];

/// A `{word}` that is not a placeholder: its line (from 1) and the word. A word is a letter or
/// `_` followed by letters, digits and `_`; other braces (CSS, `{ }`, `{a: b}`) are text.
pub(crate) fn unknown_placeholder(text: &str) -> Option<(usize, &str)> {
    let mut rest = text;
    let mut offset = 0;
    while let Some(open) = rest.find('{') {
        let after = &rest[open + 1..];
        let word_len = after
            .bytes()
            .take_while(|b| b.is_ascii_alphanumeric() || *b == b'_')
            .count();
        let word = &after[..word_len];
        let is_word = word
            .bytes()
            .next()
            .is_some_and(|b| b.is_ascii_alphabetic() || b == b'_');
        if is_word && after[word_len..].starts_with('}') && !PLACEHOLDERS.contains(&word) {
            let line = 1 + text[..offset + open]
                .bytes()
                .filter(|&b| b == b'\n')
                .count();
            return Some((line, word));
        }
        offset += open + 1;
        rest = after;
    }
    None
}

/// What is wrong with the template file at `path`, if anything: unreadable, not UTF-8, empty
/// (or only white space), or a `{word}` that is not a placeholder.
pub(crate) fn check_template_file(path: &Path) -> Result<(), String> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    if text.trim().is_empty() {
        return Err(format!(
            "{} is empty: every blocked visitor would get a blank page",
            path.display()
        ));
    }
    match unknown_placeholder(&text) {
        Some((line, word)) => Err(format!(
            "{} line {line}: {}",
            path.display(),
            unknown_message(word)
        )),
        None => Ok(()),
    }
}

/// What is wrong with the redirect URL template, if anything.
pub(crate) fn check_redirect(url: &str) -> Result<(), String> {
    match unknown_placeholder(url) {
        Some((_, word)) => Err(format!("{url:?}: {}", unknown_message(word))),
        None => Ok(()),
    }
}

fn unknown_message(word: &str) -> String {
    let known: Vec<String> = PLACEHOLDERS.iter().map(|p| format!("{{{p}}}")).collect();
    let guess = PLACEHOLDERS
        .iter()
        .map(|p| (edit_distance(word, p), p))
        .min()
        .filter(|(d, _)| *d <= 2)
        .map(|(_, p)| format!("; did you mean {{{p}}}?"))
        .unwrap_or_default();
    format!(
        "unknown placeholder {{{word}}}{guess} (placeholders: {})",
        known.join(", ")
    )
}

/// Levenshtein distance, for the suggestion.
fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut row: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut diagonal = row[0];
        row[0] = i + 1;
        for (j, cb) in b.iter().enumerate() {
            let substitute = diagonal + usize::from(ca != *cb);
            diagonal = row[j + 1];
            row[j + 1] = substitute.min(row[j] + 1).min(diagonal + 1);
        }
    }
    row[b.len()]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unknown_words_in_braces_are_found_with_their_line() {
        assert_eq!(
            unknown_placeholder("<p>{host}</p>\n<i>{hots}</i>"),
            Some((2, "hots"))
        );
        assert_eq!(unknown_placeholder("{Host}"), Some((1, "Host")));
        assert_eq!(unknown_placeholder("{{reasons}}"), Some((1, "reasons")));
        for fine in [
            "a { b: c } {host} {reason_zh}{time}",
            "{}",
            "{ host }",
            "{1}",
            "{a-b}",
            "x {",
            "{host",
            "",
        ] {
            assert_eq!(unknown_placeholder(fine), None, "{fine:?}");
        }
        for p in PLACEHOLDERS {
            assert_eq!(unknown_placeholder(&format!("{{{p}}}")), None);
        }
    }

    #[test]
    fn the_message_suggests_the_nearest_placeholder() {
        assert!(unknown_message("hots").contains("did you mean {host}?"));
        assert!(unknown_message("reasn_zh").contains("did you mean {reason_zh}?"));
        assert!(!unknown_message("weather").contains("did you mean"));
        assert!(unknown_message("weather").contains("{request_id}"));
        assert_eq!(edit_distance("hots", "host"), 2);
        assert_eq!(edit_distance("", "abc"), 3);
        assert_eq!(edit_distance("time", "time"), 0);
    }

    #[test]
    fn template_files_must_have_content() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("t.html");
        for empty in ["", " \n\t\n"] {
            std::fs::write(&p, empty).unwrap();
            assert!(check_template_file(&p).unwrap_err().contains("is empty"));
        }
        std::fs::write(&p, [0xff, 0xfe]).unwrap();
        assert!(check_template_file(&p).is_err());
        std::fs::write(&p, "<h1>{host}</h1>").unwrap();
        assert_eq!(check_template_file(&p), Ok(()));
        assert!(check_redirect("https://x/?d={hots}").is_err());
        assert_eq!(check_redirect("https://x/?d={host}&r={reason}"), Ok(()));
    }
}
