//! Azure region names. ARM accepts a region as `westus` or `West US`; it answers with the short form
//! in `location` and the display form in a gallery's replication summary.

const REGIONS: &[(&str, &str)] = &[
    ("eastus", "East US"),
    ("eastus2", "East US 2"),
    ("westus", "West US"),
    ("westus2", "West US 2"),
    ("westus3", "West US 3"),
    ("centralus", "Central US"),
    ("northcentralus", "North Central US"),
    ("southcentralus", "South Central US"),
    ("westcentralus", "West Central US"),
    ("canadacentral", "Canada Central"),
    ("brazilsouth", "Brazil South"),
    ("northeurope", "North Europe"),
    ("westeurope", "West Europe"),
    ("uksouth", "UK South"),
    ("ukwest", "UK West"),
    ("francecentral", "France Central"),
    ("germanywestcentral", "Germany West Central"),
    ("swedencentral", "Sweden Central"),
    ("switzerlandnorth", "Switzerland North"),
    ("norwayeast", "Norway East"),
    ("eastasia", "East Asia"),
    ("southeastasia", "Southeast Asia"),
    ("japaneast", "Japan East"),
    ("koreacentral", "Korea Central"),
    ("australiaeast", "Australia East"),
    ("centralindia", "Central India"),
    ("uaenorth", "UAE North"),
    ("southafricanorth", "South Africa North"),
];

/// The short form (`westus`) of a region given in either form, or `None` if Azure has no such region.
pub fn canonical(name: &str) -> Option<&'static str> {
    let squashed: String = name
        .chars()
        .filter(|c| !c.is_whitespace())
        .collect::<String>()
        .to_ascii_lowercase();
    REGIONS
        .iter()
        .find(|(short, _)| *short == squashed)
        .map(|(short, _)| *short)
}

/// The display form (`West US`) of a canonical region name.
pub fn display(canonical_name: &str) -> &'static str {
    REGIONS
        .iter()
        .find(|(short, _)| *short == canonical_name)
        .map(|(_, display)| *display)
        .unwrap_or("Unknown")
}

pub fn all() -> impl Iterator<Item = &'static str> {
    REGIONS.iter().map(|(short, _)| *short)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn both_forms_map_to_the_short_one() {
        assert_eq!(canonical("West US 2"), Some("westus2"));
        assert_eq!(canonical("westeurope"), Some("westeurope"));
        assert_eq!(canonical("Mars North"), None);
        assert_eq!(display("eastus"), "East US");
    }
}
