//! In-process tests of the directory's logic.
