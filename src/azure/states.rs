//! The states Azure reports, parsed once at the boundary. Azure spells them in PascalCase (ARM) or
//! camelCase (Batch) and does not promise to keep to its documented sets, so every parse is
//! case-insensitive and keeps a value it does not know (`Other`) rather than failing: a stage
//! decides only on the states it names and waits on the rest.

use std::fmt;

/// Declares a state enum with its documented values, their wire spelling, and `Other(String)`.
macro_rules! azure_state {
    ($(#[$doc:meta])* $name:ident { $($(#[$vdoc:meta])* $variant:ident => $wire:literal,)+ }) => {
        $(#[$doc])*
        #[derive(Debug, Clone, PartialEq, Eq)]
        pub enum $name {
            $($(#[$vdoc])* $variant,)+
            /// A value outside the documented set, as Azure spelled it.
            Other(String),
        }

        impl $name {
            /// Parses Azure's spelling in any case; an undocumented value is kept as `Other`.
            pub fn parse(value: &str) -> $name {
                $(if value.eq_ignore_ascii_case($wire) {
                    return $name::$variant;
                })+
                $name::Other(value.to_string())
            }

            /// Azure's documented spelling (or the value as read, for `Other`).
            pub fn as_str(&self) -> &str {
                match self {
                    $($name::$variant => $wire,)+
                    $name::Other(value) => value,
                }
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(self.as_str())
            }
        }
    };
}

azure_state! {
    /// An ARM resource's `provisioningState`.
    ProvisioningState {
        Creating => "Creating",
        Updating => "Updating",
        Succeeded => "Succeeded",
        Failed => "Failed",
        Deleting => "Deleting",
        Canceled => "Canceled",
        Migrating => "Migrating",
    }
}

impl ProvisioningState {
    /// Whether an operation on the resource is still running (a PUT or PATCH not yet applied).
    pub fn is_changing(&self) -> bool {
        matches!(self, ProvisioningState::Creating | ProvisioningState::Updating)
    }
}

azure_state! {
    /// A region's state in an image version's `replicationStatus.summary`.
    ReplicationState {
        Unknown => "Unknown",
        Replicating => "Replicating",
        Completed => "Completed",
        Failed => "Failed",
    }
}

azure_state! {
    /// A resource provider's `registrationState` in a subscription.
    RegistrationState {
        Registered => "Registered",
        Registering => "Registering",
        NotRegistered => "NotRegistered",
        Unregistering => "Unregistering",
    }
}

azure_state! {
    /// A Batch pool's `state`.
    PoolState {
        Active => "active",
        Deleting => "deleting",
    }
}

azure_state! {
    /// A Batch pool's `allocationState`.
    AllocationState {
        Steady => "steady",
        Resizing => "resizing",
        Stopping => "stopping",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parsing_ignores_case_and_keeps_what_it_does_not_know() {
        assert_eq!(ProvisioningState::parse("succeeded"), ProvisioningState::Succeeded);
        assert_eq!(ProvisioningState::parse("SUCCEEDED").as_str(), "Succeeded");
        assert_eq!(ReplicationState::parse("unknown"), ReplicationState::Unknown);
        assert_eq!(AllocationState::parse("Steady"), AllocationState::Steady);
        assert_eq!(PoolState::parse("upgrading"), PoolState::Other("upgrading".into()));
        assert_eq!(PoolState::parse("upgrading").to_string(), "upgrading");
        assert_eq!(RegistrationState::parse("registered"), RegistrationState::Registered);
        assert!(ProvisioningState::parse("updating").is_changing());
        assert!(!ProvisioningState::parse("Accepted").is_changing());
    }
}
