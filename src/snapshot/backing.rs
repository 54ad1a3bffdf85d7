//! change-backing-file: the backing file name an image records.

use crate::qapi::QmpError;
use crate::state::State;

/// change-backing-file: rewrites the backing file name recorded in
/// `image`, which must be in the backing chain of `device` (an export id
/// or a node name). The graph does not change.
pub fn change_backing_file(
    state: &State,
    device: &str,
    image: &str,
    backing_file: &str,
) -> Result<(), QmpError> {
    let top = match state.export(device) {
        Some(e) => e.blk.node().clone(),
        None => state
            .graph()
            .get(device)
            .map_err(|_| QmpError::generic(format!("Device '{device}' not found")))?,
    };
    let node = state
        .graph()
        .get(image)
        .map_err(|e| QmpError::generic(e.to_string()))?;
    node.ensure_active().map_err(QmpError::generic)?;
    if !top.reaches(&node) {
        return Err(QmpError::generic(format!(
            "node '{image}' is not in the backing chain of '{device}'"
        )));
    }
    let Some(q) = node.backing_file() else {
        return Err(QmpError::generic(format!(
            "node '{image}' ({}) records no backing file name",
            node.driver_name()
        )));
    };
    q.change_backing_file(backing_file)
        .map_err(QmpError::generic)?;
    log::info!("node {image}: backing file name set to '{backing_file}'");
    Ok(())
}
