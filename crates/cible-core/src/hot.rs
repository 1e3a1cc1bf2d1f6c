//! The hot store: every event of every profile in a compact in-memory columnar form, sorted by
//! time, which is what segment evaluation and scores read. 16 bytes an event.
//!
//! It is derived state: rebuilt at start from the hot rows of the durable store's `events` (see
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

/// In a property column: the event does not have the property.
pub const ABSENT: u32 = u32::MAX;
/// In a property column: the event has the property, but not as text (only the full message can
/// answer a test on it).
pub const NOT_TEXT: u32 = u32::MAX - 1;

/// Key properties an event has besides the one [`HotEvent::key`] holds (those later in
/// [`crate::message::KEY_PROPERTIES`]'s order), as (index, dictionary id or [`NOT_TEXT`]).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct OtherKeys {
    len: u8,
    items: [(u8, u32); 5],
}

impl OtherKeys {
    pub fn push(&mut self, index: u8, id: u32) {
        if usize::from(self.len) < self.items.len() {
            self.items[usize::from(self.len)] = (index, id);
            self.len += 1;
        }
    }

    pub fn iter(&self) -> impl Iterator<Item = (u8, u32)> + '_ {
        self.items[..usize::from(self.len)].iter().copied()
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

/// The value a property column holds for an event: the id of key property `property`, whether
/// the hot row holds it or it is one of the event's other keys.
fn column_value(event: &HotEvent, others: &OtherKeys, property: u8) -> u32 {
    if event.key_property() == Some(usize::from(property)) {
        return if event.key == NO_KEY {
            NOT_TEXT
        } else {
            event.key
        };
    }
    others
        .iter()
        .find(|(index, _)| *index == property)
        .map_or(ABSENT, |(_, id)| id)
}

/// A property column: for one key property that segments filter on but that another key
/// property can hide in the hot row (`category` behind `product_id`), its dictionary id for every
/// event. Per profile, either empty (no event of the profile has it) or aligned with the
/// profile's timeline, one value per event.
#[derive(Debug)]
struct Column {
    property: u8,
    profiles: Vec<Vec<u32>>,
}

impl Column {
    fn values_mut(&mut self, profile: u32) -> &mut Vec<u32> {
        let index = profile as usize;
        if index >= self.profiles.len() {
            self.profiles.resize_with(index + 1, Vec::new);
        }
        &mut self.profiles[index]
    }
}

/// A profile's events with the property columns, for evaluation.
#[derive(Debug, Clone, Copy)]
pub struct Timeline<'a> {
    pub events: &'a [HotEvent],
    hot: &'a HotStore,
    profile: u32,
}

impl Timeline<'_> {
    /// The column value of key property `property` for event `index`: `None` when no column is
    /// kept for that property.
    pub fn column(&self, index: usize, property: usize) -> Option<u32> {
        let column = self
            .hot
            .columns
            .iter()
            .find(|c| usize::from(c.property) == property)?;
        Some(
            self.hot
                .slot_index(self.profile)
                .and_then(|slot| column.profiles.get(slot))
                .and_then(|values| values.get(index))
                .copied()
                .unwrap_or(ABSENT),
        )
    }
}

/// Profiles read per hot-store read guard in a whole-population pass (segment edits,
/// recalibration, training, rebuilds): the writer, which needs the write guard for every batch,
/// waits for one such chunk at most.
pub const READ_CHUNK: usize = 512;

/// Per-profile event timelines indexed by profile ordinal, and the property columns.
#[derive(Debug, Default)]
pub struct HotStore {
    timelines: Vec<Vec<HotEvent>>,
    n_events: usize,
    columns: Vec<Column>,
    /// Per key property, how many events have it hidden behind another key (whether a column
    /// for it would help).
    hidden: [u64; 8],
    /// The first profile ordinal held: 0, except in a [`HotStore::window`] (which is read-only).
    offset: u32,
    /// Profiles whose rows changed since [`HotStore::record_changes`], while a rebuild with more
    /// columns scans the store beside the writer (`Engine::ensure_column_indexes`).
    changed: Option<rustc_hash::FxHashSet<u32>>,
}

impl HotStore {
    /// A store that keeps columns for these key properties (indexes in
    /// [`crate::message::KEY_PROPERTIES`]).
    pub fn with_columns(properties: &[u8]) -> Self {
        Self {
            columns: properties
                .iter()
                .map(|property| Column {
                    property: *property,
                    profiles: Vec::new(),
                })
                .collect(),
            ..Self::default()
        }
    }

    /// Appends the content to `out` (the snapshot's form: [`HotStore::decode`] reads it back).
    pub fn encode_into(&self, out: &mut Vec<u8>) {
        self.encode(out, |_| Ok(()))
            .expect("appending to memory does not fail");
    }

    /// [`HotStore::encode_into`], handing `out` to `flush` whenever it passes a megabyte (the
    /// caller writes it out and clears it), so a large store is never encoded whole in memory.
    pub fn encode(
        &self,
        out: &mut Vec<u8>,
        mut flush: impl FnMut(&mut Vec<u8>) -> std::io::Result<()>,
    ) -> std::io::Result<()> {
        assert_eq!(self.offset, 0, "a window is not snapshotted");
        out.push(self.columns.len() as u8);
        out.extend(self.columns.iter().map(|c| c.property));
        for hidden in self.hidden {
            out.extend_from_slice(&hidden.to_le_bytes());
        }
        let profiles: Vec<u32> = (0..self.timelines.len() as u32)
            .filter(|p| !self.timelines[*p as usize].is_empty())
            .collect();
        out.extend_from_slice(&(profiles.len() as u32).to_le_bytes());
        for profile in profiles {
            let events = &self.timelines[profile as usize];
            out.extend_from_slice(&profile.to_le_bytes());
            out.extend_from_slice(&(events.len() as u32).to_le_bytes());
            for event in events {
                out.extend_from_slice(&event.ts.to_le_bytes());
                out.extend_from_slice(&event.name.to_le_bytes());
                out.push(event.flags);
                out.push(event.kind);
                out.extend_from_slice(&event.key.to_le_bytes());
                out.extend_from_slice(&event.value.to_le_bytes());
            }
            for column in &self.columns {
                let values = column
                    .profiles
                    .get(profile as usize)
                    .map_or(&[][..], Vec::as_slice);
                out.push(u8::from(!values.is_empty()));
                for value in values {
                    out.extend_from_slice(&value.to_le_bytes());
                }
            }
            if out.len() >= 1 << 20 {
                flush(out)?;
            }
        }
        Ok(())
    }

    /// The store [`HotStore::encode_into`] wrote, read from `reader` as it streams (no copy of
    /// the whole encoding in memory); `None` if the bytes are not one.
    /// Profile ordinals must increase and stay below `profiles` (so damage cannot make it
    /// allocate without bound).
    pub fn decode(reader: &mut impl SnapshotRead, profiles: u32) -> Option<HotStore> {
        let n_columns = usize::from(reader.u8()?);
        let properties = reader.take(n_columns)?.to_vec();
        let mut hot = HotStore::with_columns(&properties);
        for hidden in &mut hot.hidden {
            *hidden = reader.u64()?;
        }
        let n_profiles = reader.u32()?;
        let mut next = 0;
        for _ in 0..n_profiles {
            let profile = reader.u32()?;
            if profile < next || profile >= profiles {
                return None;
            }
            next = profile + 1;
            let n = reader.u32()? as usize;
            let rows = reader.take(n.checked_mul(16)?)?;
            let events: Vec<HotEvent> = rows
                .chunks_exact(16)
                .map(|row| HotEvent {
                    ts: u32::from_le_bytes(row[0..4].try_into().expect("4 bytes")),
                    name: u16::from_le_bytes(row[4..6].try_into().expect("2 bytes")),
                    flags: row[6],
                    kind: row[7],
                    key: u32::from_le_bytes(row[8..12].try_into().expect("4 bytes")),
                    value: f32::from_le_bytes(row[12..16].try_into().expect("4 bytes")),
                })
                .collect();
            if profile as usize >= hot.timelines.len() {
                hot.timelines.resize_with(profile as usize + 1, Vec::new);
            }
            hot.n_events += events.len();
            hot.timelines[profile as usize] = events;
            for column in &mut hot.columns {
                if reader.u8()? == 1 {
                    let values = reader.take(n.checked_mul(4)?)?;
                    *column.values_mut(profile) = values
                        .chunks_exact(4)
                        .map(|v| u32::from_le_bytes(v.try_into().expect("4 bytes")))
                        .collect();
                }
            }
        }
        Some(hot)
    }

    /// The key properties with a column.
    pub fn columns(&self) -> Vec<u8> {
        self.columns.iter().map(|c| c.property).collect()
    }

    /// Whether some event has key property `property` hidden behind another key.
    pub fn is_hidden_somewhere(&self, property: usize) -> bool {
        self.hidden.get(property).is_some_and(|n| *n > 0)
    }

    /// A profile's events and columns.
    pub fn timeline(&self, profile: u32) -> Timeline<'_> {
        Timeline {
            events: self.events(profile),
            hot: self,
            profile,
        }
    }

    /// The events of a profile, oldest first.
    pub fn events(&self, profile: u32) -> &[HotEvent] {
        self.slot_index(profile)
            .and_then(|slot| self.timelines.get(slot))
            .map_or(&[], Vec::as_slice)
    }

    /// Where a profile's timeline is kept (a window starts at its first ordinal).
    fn slot_index(&self, profile: u32) -> Option<usize> {
        profile.checked_sub(self.offset).map(|slot| slot as usize)
    }

    /// A copy of the timelines and columns of the profiles `first..=last`, to evaluate without
    /// holding the store's read guard (the writer waits for the copy only). Read-only: the
    /// profiles outside the window read as empty.
    pub fn window(&self, first: u32, last: u32) -> HotStore {
        let range = |len: usize| (first as usize).min(len)..(last as usize + 1).min(len);
        let timelines: Vec<Vec<HotEvent>> = self.timelines[range(self.timelines.len())].to_vec();
        HotStore {
            n_events: timelines.iter().map(Vec::len).sum(),
            timelines,
            columns: self
                .columns
                .iter()
                .map(|column| Column {
                    property: column.property,
                    profiles: column.profiles[range(column.profiles.len())].to_vec(),
                })
                .collect(),
            hidden: self.hidden,
            offset: first,
            changed: None,
        }
    }

    /// Number of events held.
    pub fn n_events(&self) -> usize {
        self.n_events
    }

    /// Profiles with at least one event held.
    pub fn loaded_profiles(&self) -> Vec<u32> {
        (0..self.timelines.len() as u32)
            .filter(|p| !self.timelines[*p as usize].is_empty())
            .collect()
    }

    /// Number of profile slots (the highest ordinal plus one).
    pub fn n_slots(&self) -> usize {
        self.timelines.len()
    }

    fn slot(&mut self, profile: u32) -> &mut Vec<HotEvent> {
        assert_eq!(self.offset, 0, "a window of the hot store is read-only");
        let index = profile as usize;
        if index >= self.timelines.len() {
            self.timelines.resize_with(index + 1, Vec::new);
        }
        &mut self.timelines[index]
    }

    /// Adds an event with its other keys, keeping the timeline sorted by time (late events are
    /// inserted in place, after those of the same second).
    /// Starts noting which profiles' rows change (inserts, merges, replacements).
    pub fn record_changes(&mut self) {
        self.changed = Some(Default::default());
    }

    /// The profiles whose rows changed since [`HotStore::record_changes`]; stops noting them.
    pub fn take_changes(&mut self) -> rustc_hash::FxHashSet<u32> {
        self.changed.take().unwrap_or_default()
    }

    fn note_change(&mut self, profile: u32) {
        if let Some(changed) = &mut self.changed {
            changed.insert(profile);
        }
    }

    pub fn insert(&mut self, profile: u32, event: HotEvent, others: &OtherKeys) {
        self.note_change(profile);
        for (index, _) in others.iter() {
            self.hidden[usize::from(index & 7)] += 1;
        }
        let timeline = self.slot(profile);
        let at = match timeline.last() {
            Some(last) if last.ts > event.ts => timeline.partition_point(|e| e.ts <= event.ts),
            _ => timeline.len(),
        };
        timeline.insert(at, event);
        let len = timeline.len();
        for column in &mut self.columns {
            let value = column_value(&event, others, column.property);
            let values = column.values_mut(profile);
            if values.is_empty() && value == ABSENT {
                continue;
            }
            values.resize(len - 1, ABSENT);
            values.insert(at, value);
        }
        self.n_events += 1;
    }

    /// Moves every event of `from` into `into`, keeping time order (for events of the same
    /// second, those of `into` first) and the columns aligned.
    pub fn merge(&mut self, from: u32, into: u32) {
        self.note_change(from);
        self.note_change(into);
        let moved = std::mem::take(self.slot(from));
        let kept = std::mem::take(self.slot(into));
        let mut order: Vec<usize> = (0..kept.len() + moved.len()).collect();
        let ts = |i: usize| {
            if i < kept.len() {
                kept[i].ts
            } else {
                moved[i - kept.len()].ts
            }
        };
        order.sort_by_key(|i| ts(*i));
        for column in &mut self.columns {
            let theirs = std::mem::take(column.values_mut(from));
            let ours = std::mem::take(column.values_mut(into));
            if theirs.is_empty() && ours.is_empty() {
                continue;
            }
            let value = |i: usize| {
                if i < kept.len() {
                    ours.get(i).copied().unwrap_or(ABSENT)
                } else {
                    theirs.get(i - kept.len()).copied().unwrap_or(ABSENT)
                }
            };
            *column.values_mut(into) = order.iter().map(|i| value(*i)).collect();
        }
        *self.slot(into) = order
            .iter()
            .map(|i| {
                if *i < kept.len() {
                    kept[*i]
                } else {
                    moved[*i - kept.len()]
                }
            })
            .collect();
    }

    /// Forgets a profile's events dated before `ts` (retention), keeping the columns aligned;
    /// returns how many went.
    pub fn drop_before(&mut self, profile: u32, ts: u32) -> usize {
        let Some(index) = self
            .slot_index(profile)
            .filter(|i| *i < self.timelines.len())
        else {
            return 0;
        };
        let gone = self.timelines[index].partition_point(|e| e.ts < ts);
        if gone == 0 {
            return 0;
        }
        self.note_change(profile);
        self.timelines[index].drain(..gone);
        for column in &mut self.columns {
            let values = column.values_mut(profile);
            if !values.is_empty() {
                values.drain(..gone.min(values.len()));
                if values.iter().all(|v| *v == ABSENT) {
                    values.clear();
                }
            }
        }
        self.n_events -= gone;
        gone
    }

    /// Replaces a profile's timeline (at load, after an unmerge or an erasure); events with
    /// the same second keep their order.
    pub fn replace(&mut self, profile: u32, mut events: Vec<(HotEvent, OtherKeys)>) {
        events.sort_by_key(|(e, _)| e.ts);
        let others: Vec<(usize, OtherKeys)> = events
            .iter()
            .enumerate()
            .filter(|(_, (_, others))| !others.is_empty())
            .map(|(i, (_, others))| (i, *others))
            .collect();
        let events: Vec<HotEvent> = events.into_iter().map(|(e, _)| e).collect();
        self.replace_sorted(profile, &events, &others);
    }

    /// [`HotStore::replace`] with rows already in time order (as the store keys them) and the
    /// other keys of those that have some, by row index in increasing order.
    pub fn replace_sorted(
        &mut self,
        profile: u32,
        events: &[HotEvent],
        others: &[(usize, OtherKeys)],
    ) {
        debug_assert!(events.windows(2).all(|w| w[0].ts <= w[1].ts));
        self.note_change(profile);
        for (_, others) in others {
            for (index, _) in others.iter() {
                self.hidden[usize::from(index & 7)] += 1;
            }
        }
        let none = OtherKeys::default();
        for column in &mut self.columns {
            let mut next = others.iter().peekable();
            let values: Vec<u32> = events
                .iter()
                .enumerate()
                .map(|(i, event)| {
                    let keys = match next.peek() {
                        Some((at, keys)) if *at == i => {
                            next.next();
                            keys
                        }
                        _ => &none,
                    };
                    column_value(event, keys, column.property)
                })
                .collect();
            *column.values_mut(profile) = if values.iter().all(|v| *v == ABSENT) {
                Vec::new()
            } else {
                values
            };
        }
        let previous = std::mem::replace(self.slot(profile), events.to_vec());
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
        for column in &mut self.columns {
            for values in &mut column.profiles {
                values.shrink_to_fit();
            }
        }
    }

    /// Heap bytes held by the property columns.
    pub fn column_bytes(&self) -> usize {
        self.columns
            .iter()
            .map(|c| {
                c.profiles.capacity() * size_of::<Vec<u32>>()
                    + c.profiles.iter().map(|v| v.capacity() * 4).sum::<usize>()
            })
            .sum()
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

/// What [`HotStore::decode`] reads from: bytes in order, `None` past the end.
pub trait SnapshotRead {
    /// The next `n` bytes (valid until the next call).
    fn take(&mut self, n: usize) -> Option<&[u8]>;

    fn u8(&mut self) -> Option<u8> {
        self.take(1).map(|b| b[0])
    }

    fn u32(&mut self) -> Option<u32> {
        self.take(4)
            .map(|b| u32::from_le_bytes(b.try_into().expect("4 bytes")))
    }

    fn u64(&mut self) -> Option<u64> {
        self.take(8)
            .map(|b| u64::from_le_bytes(b.try_into().expect("8 bytes")))
    }
}

/// The hot store for one chunk of a whole-population pass: a copy of the chunk's timelines
/// (a window), or the read guard itself (see `Engine::hot_chunk`).
pub(crate) enum HotChunk<'a> {
    Window(HotStore),
    Guard(crate::lock::Ordered<parking_lot::RwLockReadGuard<'a, HotStore>>),
}

impl std::ops::Deref for HotChunk<'_> {
    type Target = HotStore;
    fn deref(&self) -> &HotStore {
        match self {
            HotChunk::Window(window) => window,
            HotChunk::Guard(guard) => guard,
        }
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
            kind: pack_kind(0, NO_PROPERTY),
            key: NO_KEY,
            value: f32::NAN,
        }
    }

    /// An event whose key is product `product` (index 0) with category `category` (index 4)
    /// hidden behind it.
    fn product(ts: u32, product: u32, category: Option<u32>) -> (HotEvent, OtherKeys) {
        let mut others = OtherKeys::default();
        if let Some(category) = category {
            others.push(4, category);
        }
        let event = HotEvent {
            kind: pack_kind(0, 0),
            key: product,
            ..at(ts)
        };
        (event, others)
    }

    fn categories(hot: &HotStore, profile: u32) -> Vec<(u32, u32)> {
        let timeline = hot.timeline(profile);
        (0..timeline.events.len())
            .map(|i| (timeline.events[i].ts, timeline.column(i, 4).unwrap()))
            .collect()
    }

    #[test]
    fn a_window_reads_its_profiles_as_the_store_does() {
        let mut hot = HotStore::with_columns(&[4]);
        for profile in 0..6u32 {
            for ts in 0..profile {
                let (event, others) = product(ts * 10, 7, (ts % 2 == 0).then_some(9));
                hot.insert(profile, event, &others);
            }
        }
        let window = hot.window(2, 4);
        for profile in 0..6u32 {
            if (2..=4).contains(&profile) {
                // Values are NaN here (no numeric property): compare the rows as printed.
                assert_eq!(
                    format!("{:?}", window.events(profile)),
                    format!("{:?}", hot.events(profile))
                );
                assert_eq!(categories(&window, profile), categories(&hot, profile));
            } else {
                assert!(window.events(profile).is_empty());
            }
        }
        assert_eq!(window.n_events(), 2 + 3 + 4);
    }

    #[test]
    fn late_events_are_inserted_in_time_order() {
        let mut hot = HotStore::default();
        for ts in [10, 30, 20, 5, 30] {
            hot.insert(3, at(ts), &OtherKeys::default());
        }
        let times: Vec<u32> = hot.events(3).iter().map(|e| e.ts).collect();
        assert_eq!(times, [5, 10, 20, 30, 30]);
        assert_eq!(hot.count_between(3, 10, 30), 4);
        assert!(hot.events(0).is_empty() && hot.events(99).is_empty());
        assert_eq!(hot.timeline(3).column(0, 4), None, "no column kept");
    }

    #[test]
    fn merge_and_replace_keep_counts() {
        let mut hot = HotStore::default();
        hot.insert(1, at(5), &OtherKeys::default());
        hot.insert(2, at(1), &OtherKeys::default());
        hot.merge(2, 1);
        assert_eq!(hot.events(1).len(), 2);
        assert_eq!(hot.events(1)[0].ts, 1);
        hot.replace(1, vec![(at(9), OtherKeys::default())]);
        assert_eq!(hot.n_events(), 1);
    }

    #[test]
    fn columns_stay_aligned_through_inserts_merges_and_replaces() {
        let mut hot = HotStore::with_columns(&[4]);
        // A profile without the property keeps no column values at all.
        hot.insert(1, at(10), &OtherKeys::default());
        assert!(hot.columns[0].profiles[1].is_empty());
        let (event, others) = product(20, 7, Some(70));
        hot.insert(1, event, &others);
        let (event, others) = product(15, 8, Some(80));
        hot.insert(1, event, &others);
        hot.insert(1, at(15), &OtherKeys::default());
        assert_eq!(
            categories(&hot, 1),
            [(10, ABSENT), (15, 80), (15, ABSENT), (20, 70)]
        );
        // Profile 2 has its category in the key itself (no product id).
        let category_key = HotEvent {
            kind: pack_kind(0, 4),
            key: 90,
            ..at(15)
        };
        hot.insert(2, category_key, &OtherKeys::default());
        let (event, others) = product(5, 9, None);
        hot.insert(2, event, &others);
        hot.merge(2, 1);
        assert_eq!(
            categories(&hot, 1),
            [
                (5, ABSENT),
                (10, ABSENT),
                (15, 80),
                (15, ABSENT),
                (15, 90),
                (20, 70)
            ]
        );
        assert!(hot.events(2).is_empty());
        assert!(hot.is_hidden_somewhere(4) && !hot.is_hidden_somewhere(1));
        hot.replace(1, vec![product(30, 1, Some(31)), product(3, 1, None)]);
        assert_eq!(categories(&hot, 1), [(3, ABSENT), (30, 31)]);
        hot.replace(1, vec![product(3, 1, None)]);
        assert_eq!(categories(&hot, 1), [(3, ABSENT)]);
    }
}
