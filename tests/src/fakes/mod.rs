//! Local fakes of the outside APIs the bridge calls, enforcing the rules the real ones do.

pub mod hubspot;
pub mod meta;
