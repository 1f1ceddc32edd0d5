//! Table tests of the SotW state machine.
