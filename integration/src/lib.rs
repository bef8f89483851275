//! Reference fleet server and test harness.
