//! The hot store: every event of every profile in a compact in-memory columnar form, sorted by
//! time, which is what segment evaluation and scores read. 16 bytes an event.
//!
//! It is derived state: rebuilt at start from the durable store's `hot` keyspace (see
//! [`crate::store`]), updated after each committed batch, never written to directly by callers.

/// Sentinel for "no dictionary id" in [`HotEvent::key`] and [`HotEvent::name`].
pub const NO_KEY: u32 = u32::MAX;
/// Sentinel name id for identify, alias and group messages, which have no event name.
pub const NO_NAME: u16 = u16::MAX;

/// "No such property" in the 3-bit property indexes packed into [`HotEvent`].
pub const NO_PROPERTY: u8 = 7;

/// Packs a message type code (3 bits) and the key property's index in
/// [`crate::message::KEY_PROPERTIES`] (3 bits, [`NO_PROPERTY`] if none).
pub fn pack_kind(type_code: u8, key_index: u8) -> u8 {
    (type_code & 7) | ((key_index & 7) << 3)
}

/// Packs anomaly flags (low 5 bits) and the value property's index in
/// [`crate::message::VALUE_PROPERTIES`] (high 3 bits, [`NO_PROPERTY`] if none).
pub fn pack_flags(anomalies: u8, value_index: u8) -> u8 {
    (anomalies & 0x1f) | ((value_index & 7) << 5)
}

/// One event, 16 bytes.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct HotEvent {
    /// Seconds since the Unix epoch, UTC. Evaluation works at one-second resolution.
    pub ts: u32,
    /// Event-name dictionary id, or [`NO_NAME`].
    pub name: u16,
    /// Anomaly flags and the value property's index, see [`pack_flags`].
    pub flags: u8,
    /// Message type and the key property's index, see [`pack_kind`].
    pub kind: u8,
    /// Dictionary id of the event's key property (product, path, campaign), or [`NO_KEY`].
    pub key: u32,
    /// The event's number (revenue, value, time on page), or NaN.
    pub value: f32,
}

const _: () = assert!(std::mem::size_of::<HotEvent>() == 16);

impl HotEvent {
    /// The [`crate::message::MessageType`] code.
    pub fn message_type(&self) -> u8 {
        self.kind & 7
    }

    /// Anomaly flags, see [`crate::quality::flags`].
    pub fn anomalies(&self) -> u8 {
        self.flags & 0x1f
    }

    /// Index in [`crate::message::KEY_PROPERTIES`] of the property [`HotEvent::key`] holds.
    pub fn key_property(&self) -> Option<usize> {
        let index = self.kind >> 3;
        (index != NO_PROPERTY).then_some(usize::from(index))
    }

    /// Index in [`crate::message::VALUE_PROPERTIES`] of the property [`HotEvent::value`] holds.
    pub fn value_property(&self) -> Option<usize> {
        let index = self.flags >> 5;
        (index != NO_PROPERTY).then_some(usize::from(index))
    }
}

/// Per-profile event timelines indexed by profile ordinal.
#[derive(Debug, Default)]
pub struct HotStore {
    timelines: Vec<Vec<HotEvent>>,
    n_events: usize,
}

impl HotStore {
    /// The events of a profile, oldest first.
    pub fn events(&self, profile: u32) -> &[HotEvent] {
        self.timelines
            .get(profile as usize)
            .map_or(&[], Vec::as_slice)
    }

    /// Number of events held.
    pub fn n_events(&self) -> usize {
        self.n_events
    }

    /// Number of profile slots (the highest ordinal plus one).
    pub fn n_slots(&self) -> usize {
        self.timelines.len()
    }

    fn slot(&mut self, profile: u32) -> &mut Vec<HotEvent> {
        let index = profile as usize;
        if index >= self.timelines.len() {
            self.timelines.resize_with(index + 1, Vec::new);
        }
        &mut self.timelines[index]
    }

    /// Adds an event, keeping the timeline sorted by time (late events are inserted in place).
    pub fn insert(&mut self, profile: u32, event: HotEvent) {
        let timeline = self.slot(profile);
        match timeline.last() {
            Some(last) if last.ts > event.ts => {
                let at = timeline.partition_point(|e| e.ts <= event.ts);
                timeline.insert(at, event);
            }
            _ => timeline.push(event),
        }
        self.n_events += 1;
    }

    /// Appends during a rebuild, where events arrive in key order (profile, time).
    pub fn push_sorted(&mut self, profile: u32, event: HotEvent) {
        self.slot(profile).push(event);
        self.n_events += 1;
    }

    /// Moves every event of `from` into `into`.
    pub fn merge(&mut self, from: u32, into: u32) {
        let moved = std::mem::take(self.slot(from));
        let target = self.slot(into);
        target.extend(moved);
        target.sort_by_key(|e| e.ts);
    }

    /// Replaces a profile's timeline (after an unmerge or an erasure).
    pub fn replace(&mut self, profile: u32, mut events: Vec<HotEvent>) {
        events.sort_by_key(|e| e.ts);
        let previous = std::mem::replace(self.slot(profile), events);
        self.n_events = self.n_events - previous.len() + self.events(profile).len();
    }

    /// Number of events of `profile` with `from <= ts <= to`.
    pub fn count_between(&self, profile: u32, from: u32, to: u32) -> usize {
        let events = self.events(profile);
        let start = events.partition_point(|e| e.ts < from);
        let end = events.partition_point(|e| e.ts <= to);
        end.saturating_sub(start)
    }

    /// Releases spare capacity (after a rebuild).
    pub fn shrink_to_fit(&mut self) {
        for timeline in &mut self.timelines {
            timeline.shrink_to_fit();
        }
        self.timelines.shrink_to_fit();
    }

    /// Heap bytes held: event storage (by capacity) plus one vector header per profile slot.
    pub fn heap_bytes(&self) -> usize {
        let events: usize = self
            .timelines
            .iter()
            .map(|t| t.capacity() * size_of::<HotEvent>())
            .sum();
        events + self.timelines.capacity() * size_of::<Vec<HotEvent>>()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(ts: u32) -> HotEvent {
        HotEvent {
            ts,
            name: 1,
            flags: 0,
            kind: 0,
            key: NO_KEY,
            value: f32::NAN,
        }
    }

    #[test]
    fn late_events_are_inserted_in_time_order() {
        let mut hot = HotStore::default();
        for ts in [10, 30, 20, 5, 30] {
            hot.insert(3, at(ts));
        }
        let times: Vec<u32> = hot.events(3).iter().map(|e| e.ts).collect();
        assert_eq!(times, [5, 10, 20, 30, 30]);
        assert_eq!(hot.count_between(3, 10, 30), 4);
        assert!(hot.events(0).is_empty() && hot.events(99).is_empty());
    }

    #[test]
    fn merge_and_replace_keep_counts() {
        let mut hot = HotStore::default();
        hot.insert(1, at(5));
        hot.insert(2, at(1));
        hot.merge(2, 1);
        assert_eq!(hot.events(1).len(), 2);
        assert_eq!(hot.events(1)[0].ts, 1);
        hot.replace(1, vec![at(9)]);
        assert_eq!(hot.n_events(), 1);
    }
}
