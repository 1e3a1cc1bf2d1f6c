//! Identity resolution: which profile a message belongs to, and which profiles it links.
//!
//! Identifiers are keyed `u:<userId>`, `a:<anonymousId>`, `e:<email>`. This module only *plans*
//! (a pure function of the graph's current state); the engine carries the plan out atomically.
//!
//! **Mega-merge guard: two profiles that each carry a userId are never merged implicitly.** A
//! shared device (anonymousId) or a shared e-mail links them only through an explicit `alias`;
//! otherwise the link is refused and counted as an identity conflict.

/// The identity graph as the planner sees it.
pub trait Graph {
    /// The live profile holding an identifier.
    fn lookup(&self, ident: &str) -> Option<u32>;
    /// Whether a profile carries at least one userId.
    fn has_user(&self, profile: u32) -> bool;
}

/// Where the message goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Target {
    Existing(u32),
    New,
}

/// A merge to carry out: `from` disappears into `into`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PlannedMerge {
    pub from: u32,
    pub into: u32,
    pub cause: String,
}

/// What to do for one message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Plan {
    pub target: Target,
    /// Merges, in order; the target named above is the survivor of all of them.
    pub merges: Vec<PlannedMerge>,
    /// Identifiers not yet in the graph, to attach to the target.
    pub attach: Vec<String>,
    /// Links refused by the mega-merge guard, as sentences.
    pub conflicts: Vec<String>,
}

pub fn user_ident(id: &str) -> String {
    format!("u:{id}")
}
pub fn anonymous_ident(id: &str) -> String {
    format!("a:{id}")
}
pub fn email_ident(email: &str) -> String {
    format!("e:{email}")
}

/// Plans the resolution of a track/identify/page/screen/group message.
pub fn plan_message(
    graph: &impl Graph,
    user_id: Option<&str>,
    anonymous_id: Option<&str>,
    email: Option<&str>,
) -> Plan {
    let user = user_id.map(|id| (user_ident(id), graph.lookup(&user_ident(id))));
    let others: Vec<(String, Option<u32>)> =
        [anonymous_id.map(anonymous_ident), email.map(email_ident)]
            .into_iter()
            .flatten()
            .map(|ident| {
                let profile = graph.lookup(&ident);
                (ident, profile)
            })
            .collect();

    let mut merges = Vec::new();
    let mut conflicts = Vec::new();
    let mut target;
    let mut target_has_user;
    match &user {
        Some((_, Some(profile))) => {
            target = Target::Existing(*profile);
            target_has_user = true;
        }
        Some((_, None)) => {
            // A new userId adopts the first linked profile that has no userId yet.
            let adoptable = others
                .iter()
                .filter_map(|(_, p)| *p)
                .find(|p| !graph.has_user(*p));
            target = adoptable.map_or(Target::New, Target::Existing);
            target_has_user = true;
        }
        None => {
            target = others
                .iter()
                .find_map(|(_, p)| *p)
                .map_or(Target::New, Target::Existing);
            target_has_user = matches!(target, Target::Existing(p) if graph.has_user(p));
        }
    }
    for (ident, profile) in &others {
        let Some(profile) = *profile else { continue };
        let Target::Existing(current) = target else {
            // The message starts a new profile: linking it to an existing one means adopting
            // that one instead, which only a profile without userId allows (handled above).
            conflicts.push(format!(
                "{ident} belongs to profile {profile}, which has another userId"
            ));
            continue;
        };
        if profile == current {
            continue;
        }
        let other_has_user = graph.has_user(profile);
        if target_has_user && other_has_user {
            conflicts.push(format!(
                "{ident} links profiles {current} and {profile}, which carry different userIds"
            ));
            continue;
        }
        let (from, into) = if other_has_user {
            (current, profile)
        } else {
            (profile, current)
        };
        let cause = match user_id {
            Some(id) => format!("identify: {ident} seen with userId {id:?}"),
            None => format!("{ident} shared"),
        };
        merges.push(PlannedMerge { from, into, cause });
        target = Target::Existing(into);
        target_has_user |= other_has_user;
    }
    let attach = user
        .into_iter()
        .chain(others)
        .filter(|(_, profile)| profile.is_none())
        .map(|(ident, _)| ident)
        .collect();
    Plan {
        target,
        merges,
        attach,
        conflicts,
    }
}

/// Plans an explicit `alias`: `previous_id` (a former userId or an anonymousId) becomes the same
/// person as `user_id`, even when both profiles carry userIds.
pub fn plan_alias(graph: &impl Graph, previous_id: &str, user_id: &str) -> Plan {
    let user = user_ident(user_id);
    let user_profile = graph.lookup(&user);
    let (previous, previous_profile) = [user_ident(previous_id), anonymous_ident(previous_id)]
        .into_iter()
        .find_map(|ident| graph.lookup(&ident).map(|p| (ident, Some(p))))
        .unwrap_or_else(|| (anonymous_ident(previous_id), None));
    let mut plan = Plan {
        target: Target::New,
        merges: Vec::new(),
        attach: Vec::new(),
        conflicts: Vec::new(),
    };
    match (previous_profile, user_profile) {
        (Some(from), Some(into)) => {
            plan.target = Target::Existing(into);
            if from != into {
                let cause = format!("alias: previousId {previous_id:?} is userId {user_id:?}");
                plan.merges.push(PlannedMerge { from, into, cause });
            }
        }
        (Some(previous_profile), None) => {
            plan.target = Target::Existing(previous_profile);
            plan.attach.push(user);
        }
        (None, Some(into)) => {
            plan.target = Target::Existing(into);
            plan.attach.push(previous);
        }
        (None, None) => plan.attach.extend([user, previous]),
    }
    plan
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    /// A graph given as `ident -> profile` and the set of profiles with a userId.
    struct Fixture(HashMap<String, u32>);

    impl Graph for Fixture {
        fn lookup(&self, ident: &str) -> Option<u32> {
            self.0.get(ident).copied()
        }
        fn has_user(&self, profile: u32) -> bool {
            self.0
                .iter()
                .any(|(ident, p)| *p == profile && ident.starts_with("u:"))
        }
    }

    fn graph(pairs: &[(&str, u32)]) -> Fixture {
        Fixture(pairs.iter().map(|(i, p)| (i.to_string(), *p)).collect())
    }

    #[test]
    fn unknown_identifiers_start_a_profile() {
        let plan = plan_message(&graph(&[]), Some("u1"), Some("d1"), None);
        assert_eq!(plan.target, Target::New);
        assert_eq!(plan.attach, ["u:u1", "a:d1"]);
    }

    #[test]
    fn identify_adopts_the_anonymous_profile() {
        let plan = plan_message(&graph(&[("a:d1", 4)]), Some("u1"), Some("d1"), None);
        assert_eq!(plan.target, Target::Existing(4));
        assert_eq!(plan.attach, ["u:u1"]);
        assert!(plan.merges.is_empty());
    }

    #[test]
    fn anonymous_history_merges_into_the_known_user() {
        let plan = plan_message(
            &graph(&[("u:u1", 1), ("a:d1", 4)]),
            Some("u1"),
            Some("d1"),
            None,
        );
        assert_eq!(plan.target, Target::Existing(1));
        assert_eq!(plan.merges.len(), 1);
        assert_eq!((plan.merges[0].from, plan.merges[0].into), (4, 1));
    }

    #[test]
    fn a_shared_device_never_merges_two_users() {
        let g = graph(&[("u:u1", 1), ("a:d1", 1), ("u:u2", 2)]);
        let plan = plan_message(&g, Some("u2"), Some("d1"), None);
        assert_eq!(plan.target, Target::Existing(2));
        assert!(plan.merges.is_empty());
        assert_eq!(plan.conflicts.len(), 1);
        // A new userId on that device starts its own profile instead of joining u1's.
        let plan = plan_message(&g, Some("u3"), Some("d1"), None);
        assert_eq!(plan.target, Target::New);
        assert!(plan.merges.is_empty() && plan.attach == ["u:u3"]);
    }

    #[test]
    fn a_shared_email_never_merges_two_users() {
        let g = graph(&[("u:u1", 1), ("e:x@y.com", 1), ("u:u2", 2)]);
        let plan = plan_message(&g, Some("u2"), None, Some("x@y.com"));
        assert_eq!(plan.target, Target::Existing(2));
        assert!(plan.merges.is_empty());
        assert_eq!(plan.conflicts.len(), 1);
    }

    #[test]
    fn anonymous_only_events_follow_the_device() {
        let plan = plan_message(&graph(&[("u:u1", 1), ("a:d1", 1)]), None, Some("d1"), None);
        assert_eq!(plan.target, Target::Existing(1));
        assert!(plan.attach.is_empty());
    }

    #[test]
    fn alias_merges_even_two_users() {
        let plan = plan_alias(&graph(&[("u:old", 1), ("u:new", 2)]), "old", "new");
        assert_eq!(plan.target, Target::Existing(2));
        assert_eq!((plan.merges[0].from, plan.merges[0].into), (1, 2));
        let plan = plan_alias(&graph(&[("a:d9", 3)]), "d9", "new");
        assert_eq!(plan.target, Target::Existing(3));
        assert_eq!(plan.attach, ["u:new"]);
    }
}
