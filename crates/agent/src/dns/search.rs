//! The search list as glibc walks it (`__res_context_search` in glibc's
//! `resolv/res_query.c`; the rules are those of resolv.conf(5) `search` and
//! `ndots`): which absolute names are asked, in which order, and which failure
//! of one ends the walk. hickory has a search list of its own, but it goes on
//! where glibc stops (a `REFUSED` or a timeout for one candidate), so the agent
//! asks hickory for absolute names only and walks the list here.
//!
//! For a name with `dots` dots:
//! - a trailing dot: only the name itself;
//! - `dots >= ndots`: the name itself first, then the search list;
//! - otherwise the search list, then the name itself.
//!
//! Within the search list, "no such name" and "no data" go on to the next
//! domain, and so does `SERVFAIL`; no server reachable at all ends the look-up
//! at once; anything else (`REFUSED`, a timeout) ends the walk, leaving only the
//! name itself to try if it was not tried yet.

use std::future::Future;

use hickory_resolver::proto::rr::Name;

/// Why one absolute name was not resolved.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Miss {
    /// `NXDOMAIN`: no such name (`HOST_NOT_FOUND`).
    NotFound,
    /// The name exists without an address of the asked type (`NO_DATA`).
    NoData,
    /// `SERVFAIL`.
    ServFail,
    /// No name server could be reached (every one answered ICMP unreachable).
    Unreachable,
    /// Anything else: `REFUSED`, another response code, a timeout.
    Failed,
}

/// Walks the search list for `name`, asking `query` for one absolute name at a
/// time; the first answer wins.
///
/// # Errors
///
/// The [`Miss`] glibc would report: that of the name itself when it was asked
/// first, else `NoData` if a domain had the name without data, else `ServFail`
/// if one failed so, else that of the last name asked.
pub async fn search<T, F, Fut>(
    name: &str,
    ndots: usize,
    domains: &[Name],
    mut query: F,
) -> Result<T, Miss>
where
    F: FnMut(Name) -> Fut,
    Fut: Future<Output = Result<T, Miss>>,
{
    let trailing_dot = name.ends_with('.');
    let bare = name.trim_end_matches('.');
    let absolute = |suffix: &str| {
        let text = if suffix.is_empty() {
            format!("{bare}.")
        } else {
            format!("{bare}.{suffix}.")
        };
        Name::from_str_relaxed(text).map_err(|_| Miss::NotFound)
    };
    if bare.is_empty() {
        return Err(Miss::NotFound);
    }
    let dots = bare.matches('.').count();
    let mut saved = None;
    let mut tried_as_is = false;
    if dots >= ndots || trailing_dot {
        match query(absolute("")?).await {
            Ok(found) => return Ok(found),
            Err(miss) if trailing_dot => return Err(miss),
            Err(miss) => {
                saved = Some(miss);
                tried_as_is = true;
            }
        }
    }
    let (mut got_nodata, mut got_servfail, mut root_on_list) = (false, false, false);
    let mut last = None;
    for domain in domains {
        let suffix = domain.to_utf8();
        let suffix = suffix.trim_matches('.');
        root_on_list |= suffix.is_empty();
        let miss = match query(absolute(suffix)?).await {
            Ok(found) => return Ok(found),
            Err(miss) => miss,
        };
        last = Some(miss);
        match miss {
            Miss::Unreachable => return Err(Miss::Unreachable),
            Miss::NoData => got_nodata = true,
            Miss::NotFound => {}
            Miss::ServFail => got_servfail = true,
            Miss::Failed => break,
        }
    }
    if !(tried_as_is || root_on_list) {
        match query(absolute("")?).await {
            Ok(found) => return Ok(found),
            Err(miss) => last = Some(miss),
        }
    }
    Err(saved
        .or(got_nodata.then_some(Miss::NoData))
        .or(got_servfail.then_some(Miss::ServFail))
        .or(last)
        .unwrap_or(Miss::NotFound))
}

#[cfg(test)]
mod tests {
    use std::str::FromStr;
    use std::sync::Mutex;

    use super::*;

    /// Runs a search where `answers` says what each absolute name gives
    /// (absent: `NotFound`); returns the result and the names asked, in order.
    fn walk(
        name: &str,
        ndots: usize,
        domains: &[&str],
        answers: &[(&str, Result<u8, Miss>)],
    ) -> (Result<u8, Miss>, Vec<String>) {
        let domains: Vec<Name> = domains.iter().map(|d| Name::from_str(d).unwrap()).collect();
        let asked = Mutex::new(Vec::new());
        let result = futures::executor::block_on(search(name, ndots, &domains, |n: Name| {
            let n = n.to_utf8();
            asked.lock().unwrap().push(n.clone());
            let answer = answers
                .iter()
                .find(|(a, _)| *a == n)
                .map(|(_, r)| *r)
                .unwrap_or(Err(Miss::NotFound));
            async move { answer }
        }));
        (result, asked.into_inner().unwrap())
    }

    #[test]
    fn few_dots_search_first_then_the_name_itself() {
        let (r, asked) = walk("svc", 1, &["a.test", "b.test"], &[]);
        assert_eq!(r, Err(Miss::NotFound));
        assert_eq!(asked, ["svc.a.test.", "svc.b.test.", "svc."]);
        let (r, asked) = walk("svc", 1, &["a.test", "b.test"], &[("svc.b.test.", Ok(7))]);
        assert_eq!(r, Ok(7));
        assert_eq!(asked, ["svc.a.test.", "svc.b.test."]);
    }

    #[test]
    fn enough_dots_ask_the_name_itself_first_and_keep_its_failure() {
        let answers = [("x.y.", Err(Miss::NoData))];
        let (r, asked) = walk("x.y", 1, &["a.test"], &answers);
        assert_eq!(asked, ["x.y.", "x.y.a.test."]);
        assert_eq!(r, Err(Miss::NoData));
        let (_, asked) = walk("svc", 0, &["a.test"], &[]);
        assert_eq!(asked, ["svc.", "svc.a.test."]);
    }

    #[test]
    fn a_trailing_dot_asks_only_the_name_itself() {
        let (r, asked) = walk("svc.a.test.", 5, &["a.test"], &[]);
        assert_eq!(r, Err(Miss::NotFound));
        assert_eq!(asked, ["svc.a.test."]);
    }

    #[test]
    fn refused_stops_the_list_servfail_does_not_unreachable_ends_all() {
        let refused = [("svc.a.test.", Err(Miss::Failed))];
        let (r, asked) = walk("svc", 1, &["a.test", "b.test"], &refused);
        assert_eq!(asked, ["svc.a.test.", "svc."]);
        assert_eq!(r, Err(Miss::NotFound));
        let servfail = [("svc.a.test.", Err(Miss::ServFail))];
        let (r, asked) = walk("svc", 1, &["a.test", "b.test"], &servfail);
        assert_eq!(asked, ["svc.a.test.", "svc.b.test.", "svc."]);
        assert_eq!(r, Err(Miss::ServFail));
        let unreachable = [("svc.a.test.", Err(Miss::Unreachable))];
        let (r, asked) = walk("svc", 1, &["a.test", "b.test"], &unreachable);
        assert_eq!(asked, ["svc.a.test."]);
        assert_eq!(r, Err(Miss::Unreachable));
    }
}
