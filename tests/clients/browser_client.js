// Runs Segment's browser library (@segment/analytics-next, unchanged, from npm) in headless
// Chromium against cible, on a page this script serves from another origin.
// Usage: node browser_client.js CIBLE_BASE WRITE_KEY PAGE_PORT
// Prints {"ids": [...messageIds cible must have], "anonymousId", "posts": [paths posted]}.
// Fails on any JavaScript error in the page, any answer of cible that is not 2xx, or a timeout.
const http = require('http')
const fs = require('fs')
const path = require('path')
const { chromium } = require('playwright-core')

const [cibleBase, writeKey, pagePort] = process.argv.slice(2)
const umd = path.join(path.dirname(require.resolve('@segment/analytics-next/package.json')), 'dist/umd')

const page = `<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>shop</title>
<script src="/ajs/index.js"></script></head>
<body><p>A page of a shop, tracked by analytics.js.</p>
<script>
  // Standard delivery (one request per call: /v1/p, /v1/t, ...), or batching (/v1/b).
  window.run = async (batching) => {
    const options = batching
      ? { integrations: { 'Segment.io': { deliveryStrategy: { strategy: 'batching', config: { size: 3, timeout: 500 } } } } }
      : {}
    const [analytics] = await AnalyticsNext.AnalyticsBrowser.load(
      { writeKey: ${JSON.stringify(writeKey)}, cdnURL: ${JSON.stringify(cibleBase)} }, options)
    const ids = []
    const keep = (ctx) => ids.push(ctx.event.messageId)
    if (batching) {
      for (let i = 0; i < 3; i++) keep(await analytics.track('Added To Cart', { i }))
    } else {
      keep(await analytics.page('Shop', 'Pricing', { plan: 'pro' }))
      keep(await analytics.track('Product Viewed', { product_id: 'P1', price: 12.5 }))
      keep(await analytics.identify('browser-user', { email: 'browser@example.com', plan: 'pro' }))
      keep(await analytics.group('browser-company', { name: 'ACME' }))
      keep(await analytics.alias('browser-user', 'browser-old-device'))
    }
    return { ids, anonymousId: analytics.user().anonymousId() }
  }
</script></body></html>`

const server = http.createServer((req, res) => {
  const url = new URL(req.url, 'http://page')
  if (url.pathname === '/') {
    res.writeHead(200, { 'content-type': 'text/html; charset=utf-8' })
    return res.end(page)
  }
  if (url.pathname.startsWith('/ajs/')) {
    const file = path.join(umd, path.basename(url.pathname))
    if (fs.existsSync(file)) {
      res.writeHead(200, { 'content-type': 'application/javascript' })
      return res.end(fs.readFileSync(file))
    }
  }
  res.writeHead(url.pathname === '/favicon.ico' ? 204 : 404)
  res.end()
})

const fail = (message) => {
  console.error(message)
  process.exit(1)
}
setTimeout(() => fail('timed out after 60 s'), 60000).unref()

server.listen(Number(pagePort), '127.0.0.1', async () => {
  const browser = await chromium.launch({
    executablePath: '/usr/bin/chromium',
    headless: true,
    args: ['--disable-gpu', '--disable-quic', '--no-first-run', '--disable-background-networking',
      '--disable-component-update', '--disable-sync'],
  })
  const errors = []
  const posts = []
  let delivered = 0
  const context = await browser.newContext()
  const watch = (tab) => {
    tab.on('pageerror', (e) => errors.push(`page error: ${e.message}`))
    tab.on('console', (m) => { if (m.type() === 'error') errors.push(`console error: ${m.text()}`) })
    tab.on('requestfailed', (r) => errors.push(`request failed: ${r.method()} ${r.url()} ${r.failure().errorText}`))
    tab.on('response', async (r) => {
      if (!r.url().startsWith(cibleBase) || r.request().method() === 'OPTIONS') return
      if (r.status() >= 300) errors.push(`${r.request().method()} ${r.url()} answered ${r.status()}: ${await r.text()}`)
      if (r.request().method() === 'POST') {
        posts.push(new URL(r.url()).pathname)
        delivered += 1
      }
    })
  }
  const until = async (condition) => {
    while (!condition() && errors.length === 0) await new Promise((resolve) => setTimeout(resolve, 50))
  }
  try {
    const first = await context.newPage()
    watch(first)
    await first.goto(`http://127.0.0.1:${pagePort}/`)
    const standard = await first.evaluate(() => window.run(false))
    await until(() => delivered >= standard.ids.length)
    // A second page of the same visitor, batching: one /v1/b for three calls.
    const second = await context.newPage()
    watch(second)
    await second.goto(`http://127.0.0.1:${pagePort}/`)
    const batched = await second.evaluate(() => window.run(true))
    await until(() => posts.includes('/v1/b'))
    if (errors.length) fail(errors.join('\n'))
    if (standard.anonymousId !== batched.anonymousId) fail('the visitor lost its anonymousId')
    console.log(JSON.stringify({ ids: standard.ids.concat(batched.ids), anonymousId: standard.anonymousId, posts }))
  } catch (e) {
    fail(`${e.stack}\n${errors.join('\n')}`)
  } finally {
    await browser.close()
    server.close()
  }
})
