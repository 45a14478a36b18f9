//! Sizes and durations for people: `1.5 GiB`, `3m 20s`.

pub use protocol::units::human_bytes;

/// A duration for people: `45s`, `3m 20s`, `2h 5m`.
pub fn human_duration(secs: u64) -> String {
    match secs {
        s if s < 60 => format!("{s}s"),
        s if s < 3600 => format!("{}m {}s", s / 60, s % 60),
        s => format!("{}h {}m", s / 3600, (s % 3600) / 60),
    }
}
