//! What the fuzz targets share: the bundled mapping, parsed once per process.

use bridge_core::mapping::Mapping;
use std::sync::OnceLock;

/// The bundled mapping contract, as the functions load it.
pub fn mapping() -> &'static Mapping {
    static M: OnceLock<Mapping> = OnceLock::new();
    M.get_or_init(|| Mapping::bundled().unwrap_or_else(|e| panic!("bundled mapping: {e}")))
}
