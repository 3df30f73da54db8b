//! What a person's browser does at Switchboard's OAuth callback: it lands on the page that
//! names the Switchboard user the connection is for, and presses Connect (or Cancel) — a form
//! POST back to the callback with the page's hidden fields.

/// The hidden fields of the confirmation form on `page`, decoded; empty when the page is not
/// the confirmation.
#[must_use]
pub fn confirmation_fields(page: &str) -> Vec<(String, String)> {
    let mut fields = Vec::new();
    for input in page.split("<input type=\"hidden\" ").skip(1) {
        let attribute = |name: &str| {
            let start = input.find(&format!("{name}=\""))? + name.len() + 2;
            let end = start + input[start..].find('"')?;
            Some(unescape(&input[start..end]))
        };
        if let (Some(name), Some(value)) = (attribute("name"), attribute("value")) {
            fields.push((name, value));
        }
    }
    fields
}

fn unescape(text: &str) -> String {
    text.replace("&quot;", "\"")
        .replace("&#39;", "'")
        .replace("&lt;", "<")
        .replace("&gt;", ">")
        .replace("&amp;", "&")
}

/// The confirmation a person sends with `decision` (`connect` or `cancel`) from the
/// confirmation `page` that `callback_url` showed: where the form posts, and its body. `None`
/// when the page is not the confirmation.
#[must_use]
pub fn confirmation_answer(
    callback_url: &str,
    page: &str,
    decision: &str,
) -> Option<(url::Url, String)> {
    let fields = confirmation_fields(page);
    if fields.is_empty() {
        return None;
    }
    let mut form = url::form_urlencoded::Serializer::new(String::new());
    for (name, value) in &fields {
        form.append_pair(name, value);
    }
    form.append_pair("decision", decision);
    // Where the form posts, resolved against the page's URL as a browser does.
    let action = page
        .split_once("<form method=\"post\" action=\"")
        .and_then(|(_, rest)| rest.split_once('"'))
        .map(|(action, _)| unescape(action))
        .expect("the confirmation form names its action");
    let action = url::Url::parse(callback_url)
        .and_then(|page_url| page_url.join(&action))
        .ok()?;
    Some((action, form.finish()))
}

/// Sends a confirmation as the page's form does.
pub async fn post_confirmation(
    browser: &reqwest::Client,
    (action, body): (url::Url, String),
) -> reqwest::Response {
    browser
        .post(action)
        .header("content-type", "application/x-www-form-urlencoded")
        .body(body)
        .send()
        .await
        .expect("confirm")
}

/// Follows a redirect to Switchboard's callback at `callback_url` the way a person does:
/// the confirmation page, then `decision` (`connect` or `cancel`). Returns the final status
/// and page, and the confirmation page (empty if there was none: an error or a spent state
/// ends at once).
pub async fn follow_callback(
    browser: &reqwest::Client,
    callback_url: &str,
    decision: &str,
) -> (u16, String, String) {
    let landed = browser.get(callback_url).send().await.expect("callback");
    let status = landed.status().as_u16();
    let page = landed.text().await.expect("page");
    let answer = confirmation_answer(callback_url, &page, decision);
    let Some(answer) = answer.filter(|_| status == 200) else {
        return (status, page, String::new());
    };
    let answered = post_confirmation(browser, answer).await;
    (
        answered.status().as_u16(),
        answered.text().await.expect("page"),
        page,
    )
}
