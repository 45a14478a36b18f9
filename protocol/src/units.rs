//! Durations and sizes as users type them (`--keep-alive 30m`, `--memory-budget 6GiB`) and
//! sizes as they read them (`1.5 GiB`).

use std::time::Duration;

/// How long loaded components stay after their last use (ollama's meaning).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeepAlive {
    /// Until `dwctl clear` or the daemon stops.
    Forever,
    /// This long after the last run that used them; zero unloads right after the run.
    For(Duration),
}

impl KeepAlive {
    /// Parses `30m`, `1h30m`, `45s`, `500ms`, a bare number of seconds, `0`, `forever`, or
    /// any negative value (forever).
    pub fn parse(text: &str) -> Result<KeepAlive, String> {
        let text = text.trim();
        if text.eq_ignore_ascii_case("forever") || text.eq_ignore_ascii_case("inf") {
            return Ok(KeepAlive::Forever);
        }
        if let Some(rest) = text.strip_prefix('-') {
            parse_duration(rest).map_err(|e| format!("keep-alive {text:?}: {e}"))?;
            return Ok(KeepAlive::Forever);
        }
        parse_duration(text)
            .map(KeepAlive::For)
            .map_err(|e| format!("keep-alive {text:?}: {e}"))
    }

    /// On the wire: milliseconds, negative for forever.
    pub fn to_ms(self) -> i64 {
        match self {
            KeepAlive::Forever => -1,
            KeepAlive::For(d) => i64::try_from(d.as_millis()).unwrap_or(i64::MAX),
        }
    }

    pub fn from_ms(ms: i64) -> KeepAlive {
        if ms < 0 {
            KeepAlive::Forever
        } else {
            KeepAlive::For(Duration::from_millis(ms as u64))
        }
    }
}

/// Parses `1h30m`, `90s`, `500ms`, `2.5m`, or a bare number of seconds.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let text = text.trim();
    if text.is_empty() {
        return Err("empty duration; write e.g. 30m, 90s, 1h".into());
    }
    if let Ok(seconds) = text.parse::<f64>() {
        return seconds_to_duration(seconds);
    }
    let mut total = 0.0;
    let mut rest = text;
    while !rest.is_empty() {
        let number_len = rest
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .unwrap_or(rest.len());
        let (number, after) = rest.split_at(number_len);
        let unit_len = after
            .find(|c: char| c.is_ascii_digit() || c == '.')
            .unwrap_or(after.len());
        let (unit, after) = after.split_at(unit_len);
        let value: f64 = number
            .parse()
            .map_err(|_| format!("`{text}` is not a duration; write e.g. 30m, 90s, 1h"))?;
        let scale = match unit {
            "ms" => 0.001,
            "s" | "sec" => 1.0,
            "m" | "min" => 60.0,
            "h" => 3600.0,
            "d" => 86400.0,
            other => {
                return Err(format!(
                    "unknown unit `{other}` in `{text}`; use ms, s, m, h or d"
                ))
            }
        };
        total += value * scale;
        rest = after;
    }
    seconds_to_duration(total)
}

fn seconds_to_duration(seconds: f64) -> Result<Duration, String> {
    Duration::try_from_secs_f64(seconds)
        .map_err(|_| format!("{seconds} s is not a usable duration"))
}

/// A size limit: bytes, or a share of what there is.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum SizeLimit {
    Bytes(u64),
    Percent(f64),
}

impl SizeLimit {
    /// Parses `80%`, `6GiB`, `6G`, `512MiB`, `1.5GB`, or a bare number of bytes.
    pub fn parse(text: &str) -> Result<SizeLimit, String> {
        let text = text.trim();
        if let Some(percent) = text.strip_suffix('%') {
            let value: f64 = percent
                .trim()
                .parse()
                .map_err(|_| format!("`{text}` is not a percentage"))?;
            if !(value > 0.0 && value <= 100.0) {
                return Err(format!(
                    "`{text}`: a percentage must be above 0 and at most 100"
                ));
            }
            return Ok(SizeLimit::Percent(value));
        }
        let split = text
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .unwrap_or(text.len());
        let (number, unit) = text.split_at(split);
        let value: f64 = number
            .parse()
            .map_err(|_| format!("`{text}` is not a size; write e.g. 6GiB, 512MiB or 80%"))?;
        let scale: f64 = match unit.trim().to_ascii_lowercase().as_str() {
            "" | "b" => 1.0,
            "k" | "kib" => 1024.0,
            "kb" => 1e3,
            "m" | "mib" => 1024.0 * 1024.0,
            "mb" => 1e6,
            "g" | "gib" => 1024.0 * 1024.0 * 1024.0,
            "gb" => 1e9,
            "t" | "tib" => 1024f64.powi(4),
            "tb" => 1e12,
            other => return Err(format!("unknown size unit `{other}` in `{text}`; use B, KiB, MiB, GiB, TiB (or KB, MB, GB, TB)")),
        };
        Ok(SizeLimit::Bytes((value * scale) as u64))
    }

    /// The limit in bytes, out of `total`.
    pub fn of(self, total: u64) -> u64 {
        match self {
            SizeLimit::Bytes(b) => b,
            SizeLimit::Percent(p) => (total as f64 * p / 100.0) as u64,
        }
    }
}

/// A size for people: `512 B`, `1.5 GiB`.
pub fn human_bytes(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut value = bytes as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit < UNITS.len() - 1 {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{bytes} B")
    } else {
        format!("{value:.1} {}", UNITS[unit])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keep_alive_reads_like_ollama() {
        assert_eq!(
            KeepAlive::parse("30m"),
            Ok(KeepAlive::For(Duration::from_secs(1800)))
        );
        assert_eq!(
            KeepAlive::parse("1h30m"),
            Ok(KeepAlive::For(Duration::from_secs(5400)))
        );
        assert_eq!(KeepAlive::parse("0"), Ok(KeepAlive::For(Duration::ZERO)));
        assert_eq!(
            KeepAlive::parse("45"),
            Ok(KeepAlive::For(Duration::from_secs(45)))
        );
        assert_eq!(
            KeepAlive::parse("500ms"),
            Ok(KeepAlive::For(Duration::from_millis(500)))
        );
        assert_eq!(KeepAlive::parse("-1"), Ok(KeepAlive::Forever));
        assert_eq!(KeepAlive::parse("-5m"), Ok(KeepAlive::Forever));
        assert_eq!(KeepAlive::parse("forever"), Ok(KeepAlive::Forever));
        assert!(KeepAlive::parse("soon").unwrap_err().contains("\"soon\""));
        assert!(KeepAlive::parse("5y")
            .unwrap_err()
            .contains("unknown unit `y`"));
    }

    #[test]
    fn keep_alive_survives_the_wire() {
        for k in [
            KeepAlive::Forever,
            KeepAlive::For(Duration::ZERO),
            KeepAlive::For(Duration::from_secs(90)),
        ] {
            assert_eq!(KeepAlive::from_ms(k.to_ms()), k);
        }
    }

    #[test]
    fn sizes_read_like_people_write_them() {
        assert_eq!(human_bytes(512), "512 B");
        assert_eq!(human_bytes(3 << 29), "1.5 GiB");
    }

    #[test]
    fn sizes_and_percentages_parse() {
        assert_eq!(SizeLimit::parse("80%"), Ok(SizeLimit::Percent(80.0)));
        assert_eq!(SizeLimit::parse("6GiB"), Ok(SizeLimit::Bytes(6 << 30)));
        assert_eq!(SizeLimit::parse("512 MiB"), Ok(SizeLimit::Bytes(512 << 20)));
        assert_eq!(
            SizeLimit::parse("1.5GB"),
            Ok(SizeLimit::Bytes(1_500_000_000))
        );
        assert_eq!(SizeLimit::parse("1000"), Ok(SizeLimit::Bytes(1000)));
        assert_eq!(SizeLimit::Percent(50.0).of(1000), 500);
        assert!(SizeLimit::parse("150%").is_err());
        assert!(SizeLimit::parse("lots").is_err());
    }
}
