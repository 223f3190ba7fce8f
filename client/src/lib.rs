//! replikv client.
