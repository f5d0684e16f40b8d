//! Closed sets of names: an enum whose every value has one canonical spelling (what r2f writes)
//! and optional aliases (what it also reads). [`named_enum!`] defines such an enum once, with
//! everything that reads or writes it: serde (the canonical name out; any spelling in, else an
//! error that lists the names), its JSON Schema (a string enum of every accepted spelling), clap's
//! `ValueEnum` (so `--help` lists the choices), `Display` and `FromStr`. A wire name is written
//! in the enum's definition and nowhere else.

/// Defines a closed set of names. `$what` names the set in error messages ("unknown mode
/// `sideways` (expected r2f, r2fplus or plain)").
///
/// ```ignore
/// named_enum! {
///     /// How a job's prompt conditions the steps.
///     pub enum JobMode("mode") {
///         R2f = "r2f",
///         Plain = "plain" | "base",
///     }
/// }
/// ```
#[macro_export]
macro_rules! named_enum {
    (
        $(#[$meta:meta])*
        $vis:vis enum $name:ident ($what:literal) {
            $(
                $(#[$vmeta:meta])*
                $variant:ident = $wire:literal $(| $alias:literal)*
            ),+ $(,)?
        }
    ) => {
        $(#[$meta])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
        $vis enum $name {
            $( $(#[$vmeta])* $variant, )+
        }

        impl $name {
            /// Every value, in definition order.
            pub const ALL: &'static [$name] = &[$($name::$variant),+];

            /// The canonical spelling.
            pub const fn name(self) -> &'static str {
                match self {
                    $( $name::$variant => $wire, )+
                }
            }

            /// The other spellings read as this value.
            pub const fn aliases(self) -> &'static [&'static str] {
                match self {
                    $( $name::$variant => &[$($alias),*], )+
                }
            }

            /// Every accepted spelling: canonical names first, then aliases.
            pub fn spellings() -> Vec<&'static str> {
                let mut out: Vec<&'static str> = Self::ALL.iter().map(|v| v.name()).collect();
                out.extend(Self::ALL.iter().flat_map(|v| v.aliases().iter().copied()));
                out
            }

            /// Reads any spelling; the error names the set and its canonical names.
            pub fn parse(s: &str) -> Result<Self, String> {
                Self::ALL
                    .iter()
                    .copied()
                    .find(|v| v.name() == s || v.aliases().contains(&s))
                    .ok_or_else(|| {
                        $crate::names::unknown($what, s, &Self::ALL.iter().map(|v| v.name()).collect::<Vec<_>>())
                    })
            }
        }

        impl ::std::fmt::Display for $name {
            fn fmt(&self, f: &mut ::std::fmt::Formatter<'_>) -> ::std::fmt::Result {
                f.write_str(self.name())
            }
        }

        impl ::std::str::FromStr for $name {
            type Err = String;

            fn from_str(s: &str) -> Result<Self, String> {
                Self::parse(s)
            }
        }

        impl ::serde::Serialize for $name {
            fn serialize<S: ::serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                s.serialize_str(self.name())
            }
        }

        impl<'de> ::serde::Deserialize<'de> for $name {
            fn deserialize<D: ::serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                struct Visitor;
                impl ::serde::de::Visitor<'_> for Visitor {
                    type Value = $name;

                    fn expecting(&self, f: &mut ::std::fmt::Formatter<'_>) -> ::std::fmt::Result {
                        write!(f, "a {} name", $what)
                    }

                    fn visit_str<E: ::serde::de::Error>(self, v: &str) -> Result<$name, E> {
                        $name::parse(v).map_err(E::custom)
                    }
                }
                d.deserialize_str(Visitor)
            }
        }

        impl ::schemars::JsonSchema for $name {
            fn schema_name() -> ::std::borrow::Cow<'static, str> {
                stringify!($name).into()
            }

            fn json_schema(_: &mut ::schemars::SchemaGenerator) -> ::schemars::Schema {
                ::schemars::json_schema!({
                    "type": "string",
                    "enum": $name::spellings(),
                })
            }
        }

        impl ::clap::ValueEnum for $name {
            fn value_variants<'a>() -> &'a [Self] {
                Self::ALL
            }

            fn to_possible_value(&self) -> Option<::clap::builder::PossibleValue> {
                Some(::clap::builder::PossibleValue::new(self.name()).aliases(self.aliases().iter().copied()))
            }
        }
    };
}

/// "unknown mode `x` (expected r2f, r2fplus or plain)", the one wording of an unknown name. The
/// given text is cut to 40 characters.
pub fn unknown(what: &str, got: &str, names: &[&str]) -> String {
    let got: String = got.chars().take(40).collect();
    format!("unknown {what} `{got}` (expected {})", or_list(names))
}

/// "a, b or c".
pub fn or_list(names: &[&str]) -> String {
    match names {
        [] => String::new(),
        [one] => one.to_string(),
        [init @ .., last] => format!("{} or {last}", init.join(", ")),
    }
}

#[cfg(test)]
mod tests {
    crate::named_enum! {
        /// A test set.
        pub enum Fruit("fruit") {
            Apple = "apple" | "malus",
            /// Yellow.
            Banana = "banana",
        }
    }

    #[test]
    fn names_read_write_and_describe_themselves() {
        assert_eq!(Fruit::parse("malus"), Ok(Fruit::Apple));
        assert_eq!("banana".parse::<Fruit>(), Ok(Fruit::Banana));
        assert_eq!(
            Fruit::parse("cherry").unwrap_err(),
            "unknown fruit `cherry` (expected apple or banana)"
        );
        assert_eq!(serde_json::to_string(&Fruit::Apple).unwrap(), "\"apple\"");
        let f: Fruit = serde_json::from_str("\"malus\"").unwrap();
        assert_eq!(f, Fruit::Apple);
        let e = serde_json::from_str::<Fruit>("\"kiwi\"")
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("unknown fruit `kiwi` (expected apple or banana)"),
            "{e}"
        );
        let e = serde_json::from_str::<Fruit>("3").unwrap_err().to_string();
        assert!(e.contains("a fruit name"), "{e}");
        let schema = serde_json::to_value(schemars::schema_for!(Fruit)).unwrap();
        assert_eq!(
            schema["enum"],
            serde_json::json!(["apple", "banana", "malus"])
        );
        assert_eq!(Fruit::Banana.to_string(), "banana");
        assert_eq!(super::or_list(&["a"]), "a");
    }
}
