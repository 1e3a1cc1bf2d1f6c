//! Aggregate analysis over the population, as pure functions of their inputs: cohort retention
//! over hot timelines ([`retention`]), the overlap of segments' memberships ([`overlap`]), and a
//! segment's size history as a series of evenly spaced points ([`series`]). The engine reads the
//! population for them (`engine/analysis.rs`); nothing here reads the store.

pub mod overlap;
pub mod retention;
pub mod series;
