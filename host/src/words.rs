//! Enums that operators read as words (an instance's state, a delivery's stage): each value
//! has one name, written by `Display` and read back by `FromStr` — one spelling for the
//! daemon and its clients.

use crate::quote::quote;

/// A word that names no value of the enum it was read as.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("no state is called {}", quote(.0))]
pub struct UnknownState(pub String);

/// `Display` and `FromStr` for an enum with `const ALL: [Self; N]` and
/// `fn name(self) -> &'static str`: its values written and read back as their names.
macro_rules! spelled_as_words {
    ($enum:ty) => {
        impl ::std::str::FromStr for $enum {
            type Err = $crate::words::UnknownState;

            /// The value whose name is `name` (a client reads the wire's words back).
            fn from_str(name: &str) -> Result<Self, Self::Err> {
                Self::ALL
                    .into_iter()
                    .find(|value| value.name() == name)
                    .ok_or_else(|| $crate::words::UnknownState(name.to_owned()))
            }
        }

        impl ::std::fmt::Display for $enum {
            fn fmt(&self, f: &mut ::std::fmt::Formatter<'_>) -> ::std::fmt::Result {
                f.write_str(self.name())
            }
        }
    };
}
pub(crate) use spelled_as_words;
