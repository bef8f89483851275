//! The words systemd uses for a unit's states, as types: `systemctl show`'s
//! `LoadState`, `ActiveState`, `SubState` and `UnitFileState`, and what
//! `systemctl is-enabled` / `is-active` print. A word this agent does not
//! know is kept as it was said ([`ActiveState::Other`]...), so nothing
//! systemd says is lost and a newer systemd's words still print; the empty
//! string (a property systemd did not give) is `Other("")`.

use std::fmt;

macro_rules! words {
    ($(#[$doc:meta])* $name:ident { $($(#[$vdoc:meta])* $variant:ident => $word:literal,)* }) => {
        $(#[$doc])*
        #[derive(Clone, Debug, PartialEq, Eq)]
        pub enum $name {
            $($(#[$vdoc])* $variant,)*
            /// A word not listed here, as systemd said it (empty when it said none).
            Other(String),
        }

        impl $name {
            /// systemd's word.
            pub fn as_str(&self) -> &str {
                match self {
                    $(Self::$variant => $word,)*
                    Self::Other(s) => s,
                }
            }

            /// Reads systemd's word; never fails ([`Self::Other`] keeps the rest).
            pub fn parse(word: &str) -> Self {
                match word {
                    $($word => Self::$variant,)*
                    other => Self::Other(other.to_owned()),
                }
            }
        }

        impl Default for $name {
            fn default() -> Self {
                Self::Other(String::new())
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(match self.as_str() {
                    "" => "unknown",
                    s => s,
                })
            }
        }

        impl serde::Serialize for $name {
            fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                s.serialize_str(self.as_str())
            }
        }

        impl<'de> serde::Deserialize<'de> for $name {
            fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                let word: std::borrow::Cow<'de, str> = serde::Deserialize::deserialize(d)?;
                Ok(Self::parse(&word))
            }
        }
    };
}

words! {
    /// Whether systemd has the unit file (`LoadState`).
    LoadState {
        /// Read and usable.
        Loaded => "loaded",
        /// No such unit file.
        NotFound => "not-found",
        /// The file has a setting systemd refuses.
        BadSetting => "bad-setting",
        /// It could not be loaded.
        Error => "error",
        /// Masked: it will not start.
        Masked => "masked",
    }
}

words! {
    /// What the unit is doing (`ActiveState`, `systemctl is-active`).
    ActiveState {
        /// Running (for a notify service: after READY).
        Active => "active",
        /// Reloading its configuration.
        Reloading => "reloading",
        /// Not running.
        Inactive => "inactive",
        /// Ended in failure.
        Failed => "failed",
        /// Starting, or waiting to be restarted.
        Activating => "activating",
        /// Stopping.
        Deactivating => "deactivating",
        /// Held for maintenance (clean-up of its directories).
        Maintenance => "maintenance",
    }
}

words! {
    /// The finer state of a service (`SubState`), where the agent tells them apart.
    SubState {
        /// Its main process runs.
        Running => "running",
        /// Waiting out `RestartSec=` before systemd restarts it.
        AutoRestart => "auto-restart",
        /// Not running.
        Dead => "dead",
        /// Ended in failure.
        Failed => "failed",
        /// `ExecStartPre=` or the main process is starting.
        Start => "start",
    }
}

words! {
    /// Whether the unit starts at boot (`UnitFileState`, `systemctl is-enabled`).
    UnitFileState {
        /// Started at boot.
        Enabled => "enabled",
        /// Not started at boot.
        Disabled => "disabled",
        /// Cannot be started at all.
        Masked => "masked",
        /// Enabled only for this boot (`/run`).
        EnabledRuntime => "enabled-runtime",
        /// Started by other units only.
        Static => "static",
        /// Made by a generator.
        Generated => "generated",
        /// A unit without its own install section.
        Indirect => "indirect",
        /// No such unit file.
        NotFound => "not-found",
    }
}

impl ActiveState {
    /// Running, or on its way to running.
    pub fn up(&self) -> bool {
        matches!(self, Self::Active | Self::Activating | Self::Reloading)
    }

    /// Between two steady states (starting, stopping, reloading).
    pub fn changing(&self) -> bool {
        matches!(
            self,
            Self::Activating | Self::Deactivating | Self::Reloading
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn words_round_trip_and_unknown_ones_are_kept() {
        for w in [
            "active",
            "reloading",
            "inactive",
            "failed",
            "activating",
            "deactivating",
            "maintenance",
        ] {
            let s = ActiveState::parse(w);
            assert!(!matches!(s, ActiveState::Other(_)), "{w}");
            assert_eq!(s.as_str(), w);
            assert_eq!(s.to_string(), w);
        }
        assert_eq!(
            ActiveState::parse("refreshing"),
            ActiveState::Other("refreshing".into())
        );
        assert_eq!(ActiveState::parse("refreshing").to_string(), "refreshing");
        assert_eq!(LoadState::default().to_string(), "unknown");
        assert_eq!(SubState::parse("auto-restart"), SubState::AutoRestart);
        assert_eq!(UnitFileState::parse("not-found"), UnitFileState::NotFound);
        assert!(ActiveState::Activating.up() && !ActiveState::Failed.up());
        assert!(ActiveState::Deactivating.changing() && !ActiveState::Active.changing());
    }

    #[test]
    fn serialised_as_systemds_word() {
        let json =
            serde_json::to_string(&[ActiveState::Failed, ActiveState::Other("x".into())]).unwrap();
        assert_eq!(json, r#"["failed","x"]"#);
        let back: Vec<UnitFileState> = serde_json::from_str(r#"["enabled","weird"]"#).unwrap();
        assert_eq!(
            back,
            [UnitFileState::Enabled, UnitFileState::Other("weird".into())]
        );
    }
}
