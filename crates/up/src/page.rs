//! The status page served at `GET /` on the status address: one self-contained HTML page
//! (inline style and script, no external assets) that draws each service's level,
//! footprint, sleeps and wakes, last wake timeline, held requests and manual state, and the
//! node's power over the last hour, refreshed every second from `/status` and `/energy`.

/// The whole page.
pub const PAGE: &str = include_str!("page.html");

#[cfg(test)]
mod tests {
    use super::PAGE;

    #[test]
    fn the_page_loads_nothing_from_elsewhere() {
        for outside in ["src=", "href=", "@import", "url(", "//cdn", "<link"] {
            assert!(!PAGE.contains(outside), "{outside:?} in the page");
        }
        // The only absolute URL is SVG's namespace name, which is never fetched.
        let urls: Vec<&str> = PAGE
            .match_indices("http")
            .map(|(i, _)| &PAGE[i..i + 26])
            .collect();
        assert_eq!(urls, ["http://www.w3.org/2000/svg"]);
    }

    #[test]
    fn the_page_reads_status_and_energy_and_refreshes_itself() {
        assert!(PAGE.starts_with("<!doctype html>"));
        for needed in [
            "fetch(\"/status\"",
            "fetch(\"/energy\"",
            "setInterval(refresh",
            "data-state",
        ] {
            assert!(PAGE.contains(needed), "{needed:?} missing");
        }
        for level in ["awake", "draining", "asleep", "waking", "failed"] {
            assert!(
                PAGE.contains(&format!("--{level}:")),
                "no colour for {level}"
            );
        }
    }
}
