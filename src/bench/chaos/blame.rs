//! Which ranks an error holds responsible: what "correctly named" means in the campaign.

use crate::Error;

/// The ranks `e` names as the cause: the peers a timeout waited on, the peer a closed, corrupt
/// or disagreeing link leads to, the failed ranks of an agreement; for a peer's abort, the
/// ranks its own error named (the peer that aborted only when its reason names none), since the
/// rank that aborts first is usually the one that saw the fault, not the fault.
pub fn blamed(e: &Error) -> Vec<usize> {
    match e {
        Error::Timeout { waiting_on, .. } => waiting_on.clone(),
        Error::Mismatch { peer, .. }
        | Error::LinkClosed { peer, .. }
        | Error::PeerExited { peer, .. }
        | Error::Corrupt { peer, .. } => vec![*peer],
        Error::PeerAborted { peer, reason, .. } => {
            let named = ranks_in(strip_at(reason));
            if named.is_empty() { vec![*peer] } else { named }
        }
        Error::Excluded { failed, .. } => failed.clone(),
        Error::NoQuorum {
            survivors, size, ..
        } => (0..*size).filter(|r| !survivors.contains(r)).collect(),
        Error::RootLost { root, .. } => vec![*root],
        // A replica that cannot prove its copy current lists the ranks it cannot reach.
        Error::Unavailable { reason, .. } => lists_in(reason),
        Error::Broken { cause, .. } => blamed(cause),
        _ => Vec::new(),
    }
}

/// `text` without a leading "rank N, op #k: " or "rank N: " (the reporter, not the cause).
fn strip_at(text: &str) -> &str {
    match text.strip_prefix("rank ") {
        Some(rest) => rest.split_once(": ").map_or(text, |(_, tail)| tail),
        None => text,
    }
}

/// The numbers of every list in `text`: "[1, 2]", "{0}".
fn lists_in(text: &str) -> Vec<usize> {
    let mut out = Vec::new();
    let mut rest = text;
    while let Some(i) = rest.find(['[', '{']) {
        let close = if rest[i..].starts_with('[') { ']' } else { '}' };
        rest = &rest[i + 1..];
        let end = rest.find(close).unwrap_or(rest.len());
        out.extend(
            rest[..end]
                .split(',')
                .filter_map(|x| x.trim().parse::<usize>().ok()),
        );
        rest = &rest[end..];
    }
    out.sort_unstable();
    out.dedup();
    out
}

/// Every rank number `text` names: "rank 3", "rank(s) [1, 2]", "ranks [0, 4]".
fn ranks_in(text: &str) -> Vec<usize> {
    let mut out = Vec::new();
    let mut rest = text;
    while let Some(i) = rest.find("rank") {
        rest = &rest[i + "rank".len()..];
        let after = rest
            .strip_prefix("(s)")
            .or_else(|| rest.strip_prefix('s'))
            .unwrap_or(rest)
            .trim_start();
        if let Some(list) = after.strip_prefix('[') {
            let end = list.find(']').unwrap_or(list.len());
            out.extend(
                list[..end]
                    .split(',')
                    .filter_map(|x| x.trim().parse::<usize>().ok()),
            );
        } else {
            let digits: String = after.chars().take_while(char::is_ascii_digit).collect();
            if let Ok(r) = digits.parse() {
                out.push(r);
            }
        }
    }
    out.sort_unstable();
    out.dedup();
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::At;
    use std::time::Duration;

    fn at(rank: usize) -> At {
        At {
            rank,
            op: Some(crate::CollectiveKind::AllReduce),
            seq: 1,
        }
    }

    #[test]
    fn a_peers_abort_names_what_its_error_named() {
        let cause = Error::Timeout {
            at: at(1),
            waiting_on: vec![3],
            waited: Duration::from_millis(200),
        };
        let e = Error::PeerAborted {
            at: at(0),
            peer: 1,
            reason: cause.to_string(),
        };
        assert_eq!(blamed(&e), [3]);
        let e = Error::PeerAborted {
            at: at(0),
            peer: 2,
            reason: "rank 2: the link to rank 0 is closed (rank gone)".into(),
        };
        assert_eq!(blamed(&e), [0]);
        let e = Error::PeerAborted {
            at: at(0),
            peer: 2,
            reason: "out of memory".into(),
        };
        assert_eq!(blamed(&e), [2]);
        let e = Error::NoQuorum {
            at: at(0),
            survivors: vec![0, 1],
            size: 5,
        };
        assert_eq!(blamed(&e), [2, 3, 4]);
        assert_eq!(ranks_in("ranks [0, 4] and rank 7"), [0, 4, 7]);
        assert_eq!(
            lists_in("server rank 0: rank(s) {2} before it are unreachable, rank(s) {} after"),
            [2]
        );
    }
}
