//! The table of families.
