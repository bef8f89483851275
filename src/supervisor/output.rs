//! A child's output, turned into log records: chunks split into lines with a
//! hard length bound (memory stays bounded whatever the child writes), bytes
//! decoded lossily, and the level and message taken from the supervisor's
//! zap JSON lines or console lines.

use std::borrow::Cow;

/// Longest line kept; the rest of a longer line is counted and dropped.
pub const MAX_LINE: usize = 16 * 1024;

/// Splits a byte stream into lines of at most [`MAX_LINE`] bytes.
#[derive(Debug, Default)]
pub struct LineSplitter {
    buf: Vec<u8>,
    /// Bytes dropped from the line being read.
    dropped: usize,
}

/// One line of output.
#[derive(Debug, PartialEq, Eq)]
pub struct Line {
    /// The kept bytes, without the newline.
    pub bytes: Vec<u8>,
    /// How many bytes of the line were dropped for length.
    pub truncated: usize,
}

impl LineSplitter {
    /// Feeds a chunk; returns the lines it completed.
    pub fn push(&mut self, mut chunk: &[u8]) -> Vec<Line> {
        let mut lines = Vec::new();
        while !chunk.is_empty() {
            match chunk.iter().position(|&b| b == b'\n') {
                Some(i) => {
                    self.take(&chunk[..i]);
                    lines.push(self.finish());
                    chunk = &chunk[i + 1..];
                }
                None => {
                    self.take(chunk);
                    break;
                }
            }
        }
        lines
    }

    /// The last, unterminated line at end of stream.
    pub fn flush(&mut self) -> Option<Line> {
        (!self.buf.is_empty() || self.dropped > 0).then(|| self.finish())
    }

    fn take(&mut self, part: &[u8]) {
        let room = MAX_LINE.saturating_sub(self.buf.len());
        let keep = part.len().min(room);
        self.buf.extend_from_slice(&part[..keep]);
        self.dropped += part.len() - keep;
    }

    fn finish(&mut self) -> Line {
        let mut bytes = std::mem::take(&mut self.buf);
        if bytes.last() == Some(&b'\r') {
            bytes.pop();
        }
        let line = Line {
            bytes,
            truncated: self.dropped,
        };
        self.dropped = 0;
        line
    }
}

/// A level for a child's log record.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Level {
    /// debug
    Debug,
    /// info
    Info,
    /// warn
    Warn,
    /// error, dpanic, panic, fatal
    Error,
}

/// A parsed record.
#[derive(Debug, PartialEq, Eq)]
pub struct Record<'a> {
    /// Its level.
    pub level: Level,
    /// The message.
    pub message: Cow<'a, str>,
    /// Other fields of a JSON line, as compact JSON, when there are any.
    pub fields: Option<String>,
}

/// Parses a line: a zap JSON record (`{"level":"info","ts":…,"msg":"…"}`),
/// a zap console record (`2026-08-05T15:54:42.823Z\tDEBUG\tcaller\tmsg`),
/// or plain text at `default` level.
pub fn parse_record(text: &str, default: Level) -> Record<'_> {
    let trimmed = text.trim();
    if trimmed.starts_with('{')
        && let Ok(serde_json::Value::Object(mut map)) =
            serde_json::from_str::<serde_json::Value>(trimmed)
    {
        let level = map
            .get("level")
            .and_then(|l| l.as_str())
            .map_or(default, |l| level_of(l).unwrap_or(default));
        let message = map.get("msg").and_then(|m| m.as_str()).map(str::to_owned);
        if let Some(message) = message {
            for k in ["level", "msg", "ts"] {
                map.remove(k);
            }
            let fields = (!map.is_empty()).then(|| serde_json::Value::Object(map).to_string());
            return Record {
                level,
                message: Cow::Owned(message),
                fields,
            };
        }
    }
    let mut parts = trimmed.splitn(3, char::is_whitespace);
    if let (Some(ts), Some(lvl), Some(rest)) = (parts.next(), parts.next(), parts.next())
        && ts.starts_with(|c: char| c.is_ascii_digit())
        && ts.contains('T')
        && let Some(level) = level_of(lvl)
    {
        return Record {
            level,
            message: Cow::Borrowed(rest.trim()),
            fields: None,
        };
    }
    Record {
        level: default,
        message: Cow::Borrowed(text),
        fields: None,
    }
}

fn level_of(s: &str) -> Option<Level> {
    match s.to_ascii_lowercase().as_str() {
        "debug" => Some(Level::Debug),
        "info" => Some(Level::Info),
        "warn" | "warning" => Some(Level::Warn),
        "error" | "dpanic" | "panic" | "fatal" => Some(Level::Error),
        _ => None,
    }
}

/// What the supervisor's messages say about its collector.
#[derive(Debug, PartialEq, Eq)]
pub enum CollectorEvent {
    /// The collector started (with its pid when the message has one).
    Started(Option<u32>),
    /// The collector exited on its own.
    Crashed(Option<i32>),
}

/// Recognises opampsupervisor's messages about its collector ("Agent
/// process started", "Agent process PID=%d exited unexpectedly, exit
/// code=%d. Will restart in a bit...").
pub fn collector_event(message: &str, fields: Option<&str>) -> Option<CollectorEvent> {
    let number_after = |hay: &str, key: &str| -> Option<i64> {
        let rest = &hay[hay.find(key)? + key.len()..];
        let end = rest
            .find(|c: char| !(c.is_ascii_digit() || c == '-'))
            .unwrap_or(rest.len());
        rest[..end].parse().ok()
    };
    if message.contains("exited unexpectedly") {
        let code = number_after(message, "exit code=").and_then(|c| i32::try_from(c).ok());
        return Some(CollectorEvent::Crashed(code));
    }
    if message.starts_with("Agent process started") {
        let pid = number_after(message, "PID=")
            .or_else(|| fields.and_then(|f| number_after(f, "\"pid\":")))
            .and_then(|p| u32::try_from(p).ok());
        return Some(CollectorEvent::Started(pid));
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splits_lines_across_chunks() {
        let mut s = LineSplitter::default();
        assert_eq!(
            s.push(b"one\ntw"),
            vec![Line {
                bytes: b"one".to_vec(),
                truncated: 0
            }]
        );
        assert_eq!(
            s.push(b"o\r\nthree"),
            vec![Line {
                bytes: b"two".to_vec(),
                truncated: 0
            }]
        );
        assert_eq!(
            s.flush(),
            Some(Line {
                bytes: b"three".to_vec(),
                truncated: 0
            })
        );
        assert_eq!(s.flush(), None);
    }

    #[test]
    fn bounds_a_megabyte_line() {
        let mut s = LineSplitter::default();
        let big = vec![b'x'; 1 << 20];
        for chunk in big.chunks(8192) {
            assert!(s.push(chunk).is_empty());
        }
        let lines = s.push(b"\nnext\n");
        assert_eq!(lines.len(), 2);
        assert_eq!(lines[0].bytes.len(), MAX_LINE);
        assert_eq!(lines[0].truncated, (1 << 20) - MAX_LINE);
        assert_eq!(
            lines[1],
            Line {
                bytes: b"next".to_vec(),
                truncated: 0
            }
        );
        assert!(s.buf.capacity() <= 2 * MAX_LINE);
    }

    #[test]
    fn records() {
        let r = parse_record(
            r#"{"level":"warn","ts":1754409282.82,"caller":"supervisor/supervisor.go:812","msg":"Setting health","healthy":false}"#,
            Level::Info,
        );
        assert_eq!(r.level, Level::Warn);
        assert_eq!(r.message, "Setting health");
        assert_eq!(
            r.fields.as_deref(),
            Some(r#"{"caller":"supervisor/supervisor.go:812","healthy":false}"#)
        );
        let r = parse_record(
            "2026-08-05T15:54:42.823Z\tDEBUG\tsupervisor/supervisor.go:2289\tSupervisor shutting down...",
            Level::Info,
        );
        assert_eq!(
            (r.level, r.message.as_ref()),
            (
                Level::Debug,
                "supervisor/supervisor.go:2289\tSupervisor shutting down..."
            )
        );
        let r = parse_record(
            "2026/11/23 15:00:00 failed to load config: boom",
            Level::Warn,
        );
        assert_eq!(
            (r.level, r.message.as_ref()),
            (
                Level::Warn,
                "2026/11/23 15:00:00 failed to load config: boom"
            )
        );
        let r = parse_record(r#"{"level":"fatal","msg":"x"}"#, Level::Info);
        assert_eq!(r.level, Level::Error);
        let r = parse_record("{not json", Level::Info);
        assert_eq!(r.message, "{not json");
    }

    #[test]
    fn collector_events() {
        assert_eq!(
            collector_event(
                "Agent process PID=4242 exited unexpectedly, exit code=2. Will restart in a bit...",
                None
            ),
            Some(CollectorEvent::Crashed(Some(2)))
        );
        assert_eq!(
            collector_event("Agent process started", Some(r#"{"pid":77}"#)),
            Some(CollectorEvent::Started(Some(77)))
        );
        assert_eq!(
            collector_event("Agent process started", None),
            Some(CollectorEvent::Started(None))
        );
        assert_eq!(collector_event("Starting agent", None), None);
    }
}
