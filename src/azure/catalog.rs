//! A short memory of what rarely changes in Azure and is read at every admission: a
//! subscription's regions and the VM sizes Batch offers in a region. Kept an hour per key, so a
//! worker admitting hundreds of runs reads each list once an hour, not once a run.

use std::collections::HashMap;
use std::future::Future;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use super::api::VmSize;
use super::error::AzureError;

/// How long a list read from Azure is reused.
const KEEP: Duration = Duration::from_secs(3600);

#[derive(Default)]
pub struct Catalog {
    locations: Mutex<HashMap<String, (Instant, Vec<String>)>>,
    vm_sizes: Mutex<HashMap<String, (Instant, Vec<VmSize>)>>,
}

async fn remembered<T: Clone, F>(
    table: &Mutex<HashMap<String, (Instant, T)>>,
    key: String,
    read: F,
) -> Result<T, AzureError>
where
    F: Future<Output = Result<T, AzureError>>,
{
    // A poisoned map only ever holds whole entries: keep using it.
    let lock = || table.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
    if let Some((at, value)) = lock().get(&key)
        && at.elapsed() < KEEP
    {
        return Ok(value.clone());
    }
    // Failures are not remembered: the next admission asks again.
    let value = read.await?;
    lock().insert(key, (Instant::now(), value.clone()));
    Ok(value)
}

impl Catalog {
    pub async fn locations<F>(&self, subscription: &str, read: F) -> Result<Vec<String>, AzureError>
    where
        F: Future<Output = Result<Vec<String>, AzureError>>,
    {
        remembered(&self.locations, subscription.to_ascii_lowercase(), read).await
    }

    pub async fn vm_sizes<F>(&self, subscription: &str, location: &str, read: F) -> Result<Vec<VmSize>, AzureError>
    where
        F: Future<Output = Result<Vec<VmSize>, AzureError>>,
    {
        let key = format!(
            "{}/{}",
            subscription.to_ascii_lowercase(),
            location.to_ascii_lowercase()
        );
        remembered(&self.vm_sizes, key, read).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_list_is_read_once_and_a_failure_not_kept() {
        let catalog = Catalog::default();
        let failed = catalog
            .locations("S", async { Err(AzureError::network("list", "reset")) })
            .await;
        assert!(failed.is_err());
        let first = catalog.locations("S", async { Ok(vec!["westus".to_string()]) }).await;
        assert_eq!(first.unwrap(), ["westus"]);
        let again = catalog.locations("s", async { panic!("read again") }).await;
        assert_eq!(again.unwrap(), ["westus"]);
    }
}
