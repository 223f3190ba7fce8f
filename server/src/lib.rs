//! replikv replica.
