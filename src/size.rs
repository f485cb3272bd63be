//! Sizes as people write them: `4096`, `512K`, `1G`, `1.5GiB`, `2T`.
//! Suffixes are binary (K = 1024), like qemu-img and nbdkit; a trailing
//! `B` or `iB` is accepted and changes nothing.

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

#[cfg(test)]
mod tests {
    use super::parse_size;

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
