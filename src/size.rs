//! Sizes as people write them: `4096`, `512K`, `1G`, `1.5GiB`, `2T`.
//! Suffixes are binary (K = 1024), like qemu-img and nbdkit; a trailing
//! `B` or `iB` is accepted and changes nothing.
//!
//! Hand-written rather than a crate (bytesize, humantime): these few lines
//! give exactly the binary-suffix rules and error messages we document.

/// Parses a size; the error says what was wrong and what is accepted.
pub fn parse_size(text: &str) -> Result<u64, String> {
    let t = text.trim();
    let split = t.find(|c: char| !(c.is_ascii_digit() || c == '.')).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let shift = match unit.trim().to_ascii_uppercase().trim_end_matches("IB").trim_end_matches('B') {
        "" => 0,
        "K" => 10,
        "M" => 20,
        "G" => 30,
        "T" => 40,
        "P" => 50,
        _ => {
            return Err(format!("{text:?}: unknown unit {unit:?} (use K, M, G, T or P)"));
        }
    };
    let bad = || format!("{text:?} is not a size (examples: 4096, 512K, 1G, 1.5T)");
    if num.is_empty() {
        return Err(bad());
    }
    let value = if let Some((whole, frac)) = num.split_once('.') {
        let whole: u64 = if whole.is_empty() { 0 } else { whole.parse().map_err(|_| bad())? };
        if frac.is_empty() || frac.len() > 9 || !frac.bytes().all(|b| b.is_ascii_digit()) {
            return Err(bad());
        }
        let scale = 10u128.pow(frac.len() as u32);
        let frac: u128 = frac.parse().map_err(|_| bad())?;
        let total = (u128::from(whole) * scale + frac) << shift;
        if !total.is_multiple_of(scale) {
            return Err(format!("{text:?} is not a whole number of bytes"));
        }
        u64::try_from(total / scale).map_err(|_| format!("{text:?} is too large"))?
    } else {
        let n: u64 = num.parse().map_err(|_| bad())?;
        n.checked_shl(shift).filter(|v| v >> shift == n).ok_or_else(|| format!("{text:?} is too large"))?
    };
    Ok(value)
}

/// Parses a duration: `500ms`, `5s`, `2m`, `1h`, `7d`; a bare number is
/// seconds.
pub fn parse_duration(text: &str) -> Result<std::time::Duration, String> {
    let t = text.trim();
    let split = t.find(|c: char| !(c.is_ascii_digit() || c == '.')).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let scale = match unit.trim() {
        "ms" => 0.001,
        "" | "s" => 1.0,
        "m" | "min" => 60.0,
        "h" => 3600.0,
        "d" => 86_400.0,
        u => return Err(format!("{text:?}: unknown unit {u:?} (use ms, s, m, h or d)")),
    };
    let value: f64 =
        num.parse().map_err(|_| format!("{text:?} is not a duration (examples: 500ms, 5s, 1h)"))?;
    let secs = value * scale;
    if !secs.is_finite() || !(0.0..=1e9).contains(&secs) {
        return Err(format!("{text:?} is out of range"));
    }
    Ok(std::time::Duration::from_secs_f64(secs))
}

/// A size for people: `1.5 GiB`.
pub fn human(bytes: u64) -> String {
    const UNITS: [&str; 6] = ["B", "KiB", "MiB", "GiB", "TiB", "PiB"];
    let mut v = bytes as f64;
    let mut u = 0;
    while v >= 1024.0 && u < UNITS.len() - 1 {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 { format!("{bytes} B") } else { format!("{v:.1} {}", UNITS[u]) }
}

#[cfg(test)]
mod tests {
    use super::{parse_duration, parse_size};

    #[test]
    fn durations() {
        use std::time::Duration;
        assert_eq!(parse_duration("500ms").unwrap(), Duration::from_millis(500));
        assert_eq!(parse_duration("5").unwrap(), Duration::from_secs(5));
        assert_eq!(parse_duration("2m").unwrap(), Duration::from_secs(120));
        assert_eq!(parse_duration("1.5h").unwrap(), Duration::from_secs(5400));
        for bad in ["", "s", "5x", "-1s", "1e400"] {
            assert!(parse_duration(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn sizes() {
        assert_eq!(parse_size("4096"), Ok(4096));
        assert_eq!(parse_size("512K"), Ok(512 << 10));
        assert_eq!(parse_size("1G"), Ok(1 << 30));
        assert_eq!(parse_size("1GiB"), Ok(1 << 30));
        assert_eq!(parse_size("4gb"), Ok(4 << 30));
        assert_eq!(parse_size("1.5G"), Ok(3 << 29));
        assert_eq!(parse_size(" 2T "), Ok(2 << 40));
        assert!(parse_size("").is_err());
        assert!(parse_size("G").is_err());
        assert!(parse_size("1X").is_err());
        assert!(parse_size("0.1").is_err());
        assert!(parse_size("99999999999P").is_err());
        assert!(parse_size("1.2.3G").is_err());
    }
}
