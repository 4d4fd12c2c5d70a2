//! Expansion of Slurm hostlists such as `gpu[01-04,07],cpu3` or `rack[1-2]-n[01-02]`.

use crate::DdpError;

/// Expands a Slurm hostlist into host names, in order. Zero padding of ranges is kept
/// (`n[08-10]` gives n08, n09, n10).
pub fn expand_hostlist(list: &str) -> Result<Vec<String>, DdpError> {
    let bad = |reason: &str| DdpError::InvalidEnv {
        var: "SLURM_NODELIST",
        value: list.to_string(),
        reason: reason.to_string(),
    };
    let mut hosts = Vec::new();
    for entry in split_top_level(list).map_err(|r| bad(&r))? {
        if entry.is_empty() {
            return Err(bad("empty host name"));
        }
        let mut expanded = vec![String::new()];
        let mut rest = entry.as_str();
        while !rest.is_empty() {
            let (literal, after) = match rest.find('[') {
                Some(i) => (&rest[..i], &rest[i..]),
                None => (rest, ""),
            };
            expanded.iter_mut().for_each(|h| h.push_str(literal));
            if after.is_empty() {
                break;
            }
            let close = after.find(']').ok_or_else(|| bad("unclosed '['"))?;
            let values = expand_ranges(&after[1..close]).map_err(|r| bad(&r))?;
            expanded = expanded
                .iter()
                .flat_map(|prefix| values.iter().map(move |v| format!("{prefix}{v}")))
                .collect();
            rest = &after[close + 1..];
        }
        hosts.extend(expanded);
    }
    if hosts.is_empty() {
        return Err(bad("no hosts"));
    }
    Ok(hosts)
}

/// Splits at commas outside brackets.
fn split_top_level(list: &str) -> Result<Vec<String>, String> {
    let (mut parts, mut current, mut depth) = (Vec::new(), String::new(), 0i32);
    for c in list.trim().chars() {
        match c {
            '[' => depth += 1,
            ']' => depth -= 1,
            ',' if depth == 0 => {
                parts.push(std::mem::take(&mut current));
                continue;
            }
            _ => {}
        }
        if !(0..=1).contains(&depth) {
            return Err("unbalanced or nested brackets".into());
        }
        current.push(c);
    }
    if depth != 0 {
        return Err("unclosed '['".into());
    }
    parts.push(current);
    Ok(parts)
}

/// `01-04,07` → ["01", "02", "03", "04", "07"].
fn expand_ranges(spec: &str) -> Result<Vec<String>, String> {
    let mut out = Vec::new();
    for part in spec.split(',') {
        let (lo, hi) = part.split_once('-').unwrap_or((part, part));
        let width = lo.len();
        let parse = |s: &str| {
            s.parse::<u64>()
                .map_err(|_| format!("`{part}` is not a number or range"))
        };
        let (a, b) = (parse(lo)?, parse(hi)?);
        if a > b {
            return Err(format!("range `{part}` runs backwards"));
        }
        if b - a > 100_000 {
            return Err(format!("range `{part}` is implausibly large"));
        }
        out.extend((a..=b).map(|v| format!("{v:0width$}")));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn expands_ranges_lists_padding_and_plain_hosts() {
        assert_eq!(
            expand_hostlist("gpu[01-04,07],cpu3").unwrap(),
            ["gpu01", "gpu02", "gpu03", "gpu04", "gpu07", "cpu3"]
        );
        assert_eq!(expand_hostlist("n[08-10]").unwrap(), ["n08", "n09", "n10"]);
        assert_eq!(expand_hostlist("localhost").unwrap(), ["localhost"]);
        assert_eq!(expand_hostlist("a,b").unwrap(), ["a", "b"]);
    }

    #[test]
    fn expands_several_bracket_groups_as_a_product() {
        assert_eq!(
            expand_hostlist("r[1-2]-n[1,3]").unwrap(),
            ["r1-n1", "r1-n3", "r2-n1", "r2-n3"]
        );
    }

    #[test]
    fn rejects_malformed_lists_naming_the_variable() {
        for bad in ["gpu[01-", "gpu[a-b]", "gpu[5-1]", "", "x,,y", "a[1[2]]"] {
            let err = expand_hostlist(bad).unwrap_err().to_string();
            assert!(err.contains("SLURM_NODELIST"), "{bad:?}: {err}");
        }
    }
}
