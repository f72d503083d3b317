//! Query parameters of `/v1` calls, percent-decoded.

/// Query parameters, percent-decoded.
pub(super) struct Query(Vec<(String, String)>);

impl Query {
    pub(super) fn parse(raw: Option<&str>) -> Query {
        Query(
            raw.unwrap_or("")
                .split('&')
                .filter(|p| !p.is_empty())
                .filter_map(|pair| {
                    let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
                    Some((percent_decode(k)?, percent_decode(&v.replace('+', " "))?))
                })
                .collect(),
        )
    }

    /// The parameters not in `known`, in the order given.
    pub(super) fn unknown(&self, known: &[&str]) -> Vec<&str> {
        let mut out: Vec<&str> = Vec::new();
        for (k, _) in &self.0 {
            if !known.contains(&k.as_str()) && !out.contains(&k.as_str()) {
                out.push(k);
            }
        }
        out
    }

    pub(super) fn get(&self, key: &str) -> Option<&str> {
        self.0
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }
}

pub(super) fn percent_decode(s: &str) -> Option<String> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = std::str::from_utf8(bytes.get(i + 1..i + 3)?).ok()?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn query_and_percent_decoding() {
        let q = Query::parse(Some(
            "host=%E4%BE%8B%E5%AD%90.%E4%B8%AD%E5%9B%BD&dst=10.0.0.1&expect_revision=3",
        ));
        assert_eq!(q.get("host"), Some("例子.中国"));
        assert_eq!(q.get("dst"), Some("10.0.0.1"));
        assert_eq!(q.get("expect_revision"), Some("3"));
        assert_eq!(q.unknown(&["host", "dst"]), ["expect_revision"]);
        assert!(q.unknown(&["host", "dst", "expect_revision"]).is_empty());
        assert_eq!(percent_decode("%zz"), None);
        assert_eq!(percent_decode("%e4"), None, "not UTF-8");
    }
}
