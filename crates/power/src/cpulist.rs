//! Kernel CPU lists (`0-3,8,10-11`), as in `/sys/devices/system/cpu/online` and `cpuset.cpus`.

use std::collections::BTreeSet;

/// CPUs a kernel can have (`NR_CPUS` is at most 8192): a list naming more is refused, not
/// expanded one number at a time (a range like `0-18446744073709551615` in a config would
/// otherwise hang, then exhaust memory).
pub const MAX_CPUS: usize = 8192;

/// Parses a CPU list; `None` names the first bad part.
pub fn parse(text: &str) -> Result<BTreeSet<usize>, String> {
    let mut cpus = BTreeSet::new();
    for part in text.trim().split(',').filter(|p| !p.is_empty()) {
        let bad = || format!("{part:?} is not a CPU number or range");
        let cpu = |n: &str| match n.parse::<usize>() {
            Ok(n) if n < MAX_CPUS => Ok(n),
            Ok(_) => Err(format!(
                "{part:?} names a CPU beyond the {MAX_CPUS} a kernel can have"
            )),
            Err(_) => Err(bad()),
        };
        match part.split_once('-') {
            Some((a, b)) => {
                let (a, b) = (cpu(a)?, cpu(b)?);
                if a > b {
                    return Err(bad());
                }
                cpus.extend(a..=b);
            }
            None => {
                cpus.insert(cpu(part)?);
            }
        }
    }
    Ok(cpus)
}

/// Formats CPUs as the kernel does, with ranges.
pub fn format(cpus: &BTreeSet<usize>) -> String {
    let mut parts = Vec::new();
    let mut iter = cpus.iter().copied().peekable();
    while let Some(start) = iter.next() {
        let mut end = start;
        while iter.peek() == Some(&(end + 1)) {
            end = iter.next().unwrap_or(end);
        }
        parts.push(if start == end {
            start.to_string()
        } else {
            format!("{start}-{end}")
        });
    }
    parts.join(",")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip() {
        let cpus = parse("0-3,8,10-11\n").unwrap();
        assert_eq!(cpus.len(), 7);
        assert_eq!(format(&cpus), "0-3,8,10-11");
        assert_eq!(format(&parse("").unwrap()), "");
    }

    #[test]
    fn bad_parts_are_named() {
        assert!(parse("0-x").unwrap_err().contains("0-x"));
        assert!(parse("3-1").is_err());
    }
}
