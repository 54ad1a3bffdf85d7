//! Permissions a parent takes on a child node, and shares with other parents.

use std::fmt;
use std::ops::{BitAnd, BitOr, Not};

/// A set of QEMU block permissions.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct Perm(u8);

impl Perm {
    pub const NONE: Perm = Perm(0);
    /// Reads return what the node's image holds (no one changes it mid-read
    /// behind the graph's back).
    pub const CONSISTENT_READ: Perm = Perm(1);
    /// Writes that change the data.
    pub const WRITE: Perm = Perm(2);
    /// Writes that leave the data as it was (e.g. copy-on-read).
    pub const WRITE_UNCHANGED: Perm = Perm(4);
    /// Changing the node's size.
    pub const RESIZE: Perm = Perm(8);
    pub const ALL: Perm = Perm(15);

    pub fn contains(self, other: Perm) -> bool {
        self.0 & other.0 == other.0
    }

    pub fn is_empty(self) -> bool {
        self.0 == 0
    }

    pub fn bits(self) -> u8 {
        self.0
    }

    pub fn from_bits(b: u8) -> Perm {
        Perm(b & Perm::ALL.0)
    }
}

impl BitOr for Perm {
    type Output = Perm;
    fn bitor(self, rhs: Perm) -> Perm {
        Perm(self.0 | rhs.0)
    }
}

impl BitAnd for Perm {
    type Output = Perm;
    fn bitand(self, rhs: Perm) -> Perm {
        Perm(self.0 & rhs.0)
    }
}

impl Not for Perm {
    type Output = Perm;
    fn not(self) -> Perm {
        Perm(!self.0 & Perm::ALL.0)
    }
}

impl fmt::Display for Perm {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        const NAMES: [(Perm, &str); 4] = [
            (Perm::CONSISTENT_READ, "consistent-read"),
            (Perm::WRITE, "write"),
            (Perm::WRITE_UNCHANGED, "write-unchanged"),
            (Perm::RESIZE, "resize"),
        ];
        let names: Vec<&str> = NAMES
            .iter()
            .filter(|(p, _)| self.contains(*p))
            .map(|(_, n)| *n)
            .collect();
        if names.is_empty() {
            f.write_str("nothing")
        } else {
            f.write_str(&names.join(", "))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn not_stays_within_known_bits() {
        assert_eq!(!Perm::ALL, Perm::NONE);
        assert_eq!(
            !Perm::WRITE,
            Perm::CONSISTENT_READ | Perm::WRITE_UNCHANGED | Perm::RESIZE
        );
    }

    #[test]
    fn display_lists_names() {
        assert_eq!((Perm::WRITE | Perm::RESIZE).to_string(), "write, resize");
        assert_eq!(Perm::NONE.to_string(), "nothing");
    }
}
