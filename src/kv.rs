//! Shell-style `KEY=value` files (`/etc/os-release`, `/etc/default/*`):
//! one reading for all of them. Pure.

/// The assignments in `text`, in order: blank lines and `#` comments
/// skipped, keys and values trimmed, one pair of matching quotes removed
/// from a value, and inside double quotes the shell's escapes (`\"`, `\\`,
/// `` \` ``, `\$`) undone. A line without `=` is skipped.
pub fn assignments(text: &str) -> Vec<(String, String)> {
    text.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .filter_map(|l| {
            let (k, v) = l.split_once('=')?;
            Some((k.trim().to_owned(), unquote(v.trim())))
        })
        .collect()
}

fn unquote(v: &str) -> String {
    if let Some(inner) = v.strip_prefix('"').and_then(|v| v.strip_suffix('"')) {
        let mut out = String::with_capacity(inner.len());
        let mut chars = inner.chars();
        while let Some(c) = chars.next() {
            match (c, chars.clone().next()) {
                ('\\', Some(n @ ('"' | '\\' | '`' | '$'))) => {
                    out.push(n);
                    chars.next();
                }
                _ => out.push(c),
            }
        }
        return out;
    }
    v.strip_prefix('\'')
        .and_then(|v| v.strip_suffix('\''))
        .unwrap_or(v)
        .to_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quotes_comments_and_escapes() {
        let got = assignments(
            "# comment\n\nID=debian\nPRETTY_NAME=\"Debian \\\"12\\\" \\\\ $x\"\n  CUSTOM_ARGS = '--a=b'  \nnot an assignment\nEMPTY=\n",
        );
        assert_eq!(
            got,
            [
                ("ID".into(), "debian".into()),
                ("PRETTY_NAME".into(), "Debian \"12\" \\ $x".into()),
                ("CUSTOM_ARGS".into(), "--a=b".into()),
                ("EMPTY".into(), String::new()),
            ]
        );
    }
}
