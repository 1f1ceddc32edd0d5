//! Table tests of the adjustments.
