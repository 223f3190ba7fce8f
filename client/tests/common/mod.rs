//! The scripted in-process `Kv` servers of the client tests, which live in
//! `replikv-testkit`; each test binary says `mod common;` and uses part of them.

// Each test binary uses a different part of it.
#![allow(unused_imports)]

pub use replikv_testkit::fake::*;
