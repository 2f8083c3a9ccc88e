//! One PostgreSQL database per test, so tests never see each other's rows.
//!
//! The server is the one `.ci/run` starts (`TASKGATE_TEST_PG`, default
//! `postgres://postgres@127.0.0.1:5432/postgres`). Each [`TestDb`] creates a database
//! with a random name and drops it when the test ends.

use sqlx::{Connection, Executor, PgConnection};

/// The admin URL tests create their databases through.
pub fn admin_url() -> String {
    std::env::var("TASKGATE_TEST_PG")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".to_string())
}

/// A fresh, empty database; dropped (with its connections) on drop.
pub struct TestDb {
    /// Its name.
    pub name: String,
    /// A URL that connects to it.
    pub url: String,
}

impl TestDb {
    /// Creates the database. Panics with a hint when PostgreSQL is not reachable.
    pub async fn new() -> Self {
        let admin = admin_url();
        let mut conn = PgConnection::connect(&admin).await.unwrap_or_else(|e| {
            panic!("cannot reach PostgreSQL at {admin} ({e}); start it or set TASKGATE_TEST_PG")
        });
        let name = format!(
            "taskgate_test_{}_{:016x}",
            std::process::id(),
            rand::random::<u64>()
        );
        conn.execute(format!("CREATE DATABASE {name}").as_str())
            .await
            .expect("create test database");
        let base = admin.rsplit_once('/').map_or(admin.as_str(), |(b, _)| b);
        let url = format!("{base}/{name}");
        Self { name, url }
    }
}

impl Drop for TestDb {
    fn drop(&mut self) {
        let admin = admin_url();
        let name = self.name.clone();
        // Drop runs outside any async context we may block; use a throwaway runtime on
        // its own thread.
        let _ = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            rt.block_on(async {
                let mut conn = PgConnection::connect(&admin).await?;
                conn.execute(format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)").as_str())
                    .await?;
                Ok::<_, sqlx::Error>(())
            })
            .map_err(std::io::Error::other)
        })
        .join();
    }
}
