//! The integration tests' shared fixtures, which live in `replikv-testkit`; each test
//! binary says `mod common;` and uses part of them.

// Each test binary uses a different part of it.
#![allow(unused_imports)]

pub use replikv_testkit::fixtures::*;
pub use replikv_testkit::{ClusterOptions, LocalCluster, ServerCommand};
