//! One identity on two machines: the server's view. Every agent process
//! sends a random run id with each report; reports of one host that keep
//! alternating between two run ids come from two agents presenting the same
//! certificate at once (a clone whose machine id was not regenerated, so it
//! cannot tell it is a copy). A restart changes the run id once and never
//! back, so it is never taken for a duplicate; what counts is a run id
//! *coming back* after another one reported. Pure: the caller brings the
//! clock.

use std::collections::VecDeque;

/// Reports remembered per host.
const KEPT: usize = 8;

/// Returns of a run id (a report whose run id reported before, with
/// another in between) that make a duplicate: A B A B A. A restart has
/// none; a last report of the old process racing the new one's first, one
/// (A B A B at worst, two).
pub const RETURNS: usize = 3;

/// What the server remembers of a host's recent reports (in memory only).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Runs {
    recent: VecDeque<(u64, i64)>,
}

/// A duplicate seen: the run ids that alternate and when.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Evidence {
    /// Distinct run ids among the recent reports, oldest first.
    pub run_ids: Vec<u64>,
    /// Returns of a run id among them.
    pub returns: usize,
}

impl Runs {
    /// Takes in a report of `run_id` at `now_ms` and says whether the recent
    /// reports, those within `window_ms`, show two agents at once. A run id
    /// of 0 (agents before run ids) tells nothing.
    pub fn observe(&mut self, run_id: u64, now_ms: i64, window_ms: i64) -> Option<Evidence> {
        if run_id == 0 {
            return None;
        }
        self.recent.push_back((run_id, now_ms));
        while self.recent.len() > KEPT
            || self
                .recent
                .front()
                .is_some_and(|(_, at)| now_ms.saturating_sub(*at) > window_ms)
        {
            self.recent.pop_front();
        }
        let mut run_ids: Vec<u64> = Vec::new();
        let mut returns = 0;
        let mut previous = None;
        for (r, _) in &self.recent {
            if run_ids.contains(r) {
                if previous != Some(*r) {
                    returns += 1;
                }
            } else {
                run_ids.push(*r);
            }
            previous = Some(*r);
        }
        (returns >= RETURNS).then_some(Evidence { run_ids, returns })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const W: i64 = 60_000;

    #[test]
    fn alternating_run_ids_are_a_duplicate() {
        let mut r = Runs::default();
        let seen: Vec<bool> = [1, 2, 1, 2, 1]
            .iter()
            .enumerate()
            .map(|(i, id)| r.observe(*id, i as i64 * 1000, W).is_some())
            .collect();
        assert_eq!(seen, [false, false, false, false, true]);
        assert_eq!(
            r.observe(2, 6000, W),
            Some(Evidence {
                run_ids: vec![1, 2],
                returns: 4
            })
        );
    }

    #[test]
    fn restarts_are_not_duplicates() {
        let mut r = Runs::default();
        // Quick restarts, one of them with the old process's last report
        // racing the new one's first (3 2 3).
        for (i, id) in [1, 1, 2, 2, 3, 2, 3, 3, 4, 5, 5].iter().enumerate() {
            assert_eq!(r.observe(*id, i as i64 * 1000, W), None, "report {i}");
        }
        assert_eq!(r.observe(0, 20_000, W), None, "no run id, no verdict");
    }

    #[test]
    fn old_reports_fall_out_of_the_window() {
        let mut r = Runs::default();
        for (i, id) in [1, 2, 1].iter().enumerate() {
            r.observe(*id, i as i64 * 1000, W);
        }
        // Much later: one agent left; what it sends clears the picture.
        assert_eq!(r.observe(2, 10 * W, W), None);
        assert_eq!(r.observe(2, 10 * W + 1000, W), None);
    }
}
