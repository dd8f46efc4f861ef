/*
 * The chat lines. Follows the newest line only while the reader is at the
 * bottom; a reader scrolled up keeps their place and gets a "New messages"
 * button instead.
 *
 * A chat's attachments: images as thumbnails (click: the full size in the
 * lightbox), other files as download links with name and size. Their URLs
 * carry the session's upload token, so a line waits for one before it
 * shows them, and a link takes the current token when it is followed.
 */
(function (ChatApp, Backbone, _) {
  'use strict';

  var BOTTOM_SLACK = 24; // px from the bottom that still counts as "at the bottom"
  var models = ChatApp.models;

  var ChatLineView = Backbone.View.extend({
    tagName: 'li',
    template: ChatApp.template('chat-line-template'),

    events: {
      'click a[data-file]': 'openFile',
      'auxclick a[data-file]': 'refreshLink',
      'contextmenu a[data-file]': 'refreshLink'
    },

    initialize: function (options) {
      this.me = options.me;
      this.files = options.files;         // FileAccess: the token for /files URLs
      this.showImage = options.showImage; // function (attachment): the full size
      this.listenTo(this.model, 'change', this.render);
    },

    render: function () {
      var data = this.model.view();
      var files = this.files;
      var mine = data.kind === 'chat' && data.sender === this.me();
      var attachments = data.attachments || [];
      this.el.className = 'chat-line chat-' + data.kind + (mine ? ' chat-mine' : '') +
        (attachments.length ? ' chat-files' : '');
      if (data.position !== undefined) {
        this.el.setAttribute('data-position', data.position);
      }
      if (attachments.length && !files.valid()) {
        // Shown without URLs until a token comes.
        files.ensure();
        this.stopListening(files, 'granted');
        this.listenToOnce(files, 'granted', this.render);
      }
      data.attachments = _.map(attachments, function (a, i) { return files.describe(a, i); });
      this.$el.html(this.template(data));
      this.watchThumbs();
      return this;
    },

    // A thumbnail that fails to load with a token that has since been
    // replaced is asked for again with the new one; otherwise it is shown
    // as broken (its name stays).
    watchThumbs: function () {
      var self = this;
      this.$('img.att-thumb').each(function () {
        var img = this;
        img.addEventListener('error', function () {
          var a = self.attachment(img.closest('a[data-file]'));
          var fresh = a && self.files.valid() ? self.files.url(a.id, true) : '';
          if (fresh && fresh !== img.getAttribute('src')) {
            img.setAttribute('src', fresh);
          } else {
            img.closest('.attachment').classList.add('att-broken');
          }
        });
      });
    },

    attachment: function (link) {
      var index = link ? parseInt(link.getAttribute('data-file'), 10) : NaN;
      return (this.model.get('attachments') || [])[index] || null;
    },

    // Links are rendered with the token of their time: follow them with the current one.
    refreshLink: function (event) {
      var a = this.attachment(event.currentTarget);
      if (a && this.files.valid()) {
        event.currentTarget.setAttribute('href', this.files.url(a.id, false));
      }
      return a;
    },

    openFile: function (event) {
      if (!this.files.valid()) {
        event.preventDefault(); // its URL would be refused: the line shows it again with a token
        this.files.ensure();
        return;
      }
      var a = this.refreshLink(event);
      if (!a || !models.isInlineImage(a)) {
        return; // a download: the browser follows the link
      }
      if (event.ctrlKey || event.metaKey || event.shiftKey || event.button !== 0) {
        return; // a new tab or window, as the reader asked
      }
      event.preventDefault();
      this.showImage(a);
    }
  });

  ChatApp.views.ChatListView = Backbone.View.extend({
    events: {},

    initialize: function (options) {
      this.scroller = options.scroller; // the scrolling element around the list
      this.newBelow = options.newBelow; // the "New messages" button
      this.me = options.me;             // function: the logged-in name
      this.files = options.files;
      this.showImage = options.showImage;
      this.lineViews = {};
      this.following = true;            // at the bottom: a picture that loads keeps it there
      this.listenTo(this.collection, 'add', this.added);
      this.listenTo(this.collection, 'remove', this.removed);
      this.listenTo(this.collection, 'reset', this.render);
      this.onScroll = _.bind(this.scrolled, this);
      this.scroller.addEventListener('scroll', this.onScroll, { passive: true });
      this.newBelow.addEventListener('click', _.bind(this.scrollToBottom, this));
      // Pictures without known dimensions grow their line when they load
      // (load does not bubble: caught on the way down).
      this.onLoad = _.bind(function (event) {
        if (event.target.tagName === 'IMG' && this.following) {
          this.scrollToBottom();
        }
      }, this);
      this.el.addEventListener('load', this.onLoad, true);
    },

    render: function () {
      _.invoke(_.values(this.lineViews), 'remove');
      this.lineViews = {};
      var fragment = document.createDocumentFragment();
      this.collection.each(function (model) {
        fragment.appendChild(this.lineView(model).el);
      }, this);
      this.el.appendChild(fragment);
      this.scrollToBottom();
      return this;
    },

    lineView: function (model) {
      var view = new ChatLineView({ model: model, me: this.me, files: this.files, showImage: this.showImage }).render();
      this.lineViews[model.cid] = view;
      return view;
    },

    atBottom: function () {
      var s = this.scroller;
      return s.scrollHeight - s.scrollTop - s.clientHeight <= BOTTOM_SLACK;
    },

    added: function (model, collection) {
      var wasAtBottom = this.atBottom();
      var oldHeight = this.scroller.scrollHeight;
      var oldTop = this.scroller.scrollTop;
      // The first later line already on screen (several lines added at once
      // fire their `add` events after all of them are in the collection).
      var nextView = null;
      for (var i = collection.indexOf(model) + 1; i < collection.length && !nextView; i++) {
        nextView = this.lineViews[collection.at(i).cid] || null;
      }
      var el = this.lineView(model).el;
      if (nextView) {
        this.el.insertBefore(el, nextView.el);
      } else {
        this.el.appendChild(el);
      }
      if (wasAtBottom) {
        this.scrollToBottom();
      } else if (nextView) {
        // Inserted above (older history): keep the lines being read in place.
        this.scroller.scrollTop = oldTop + (this.scroller.scrollHeight - oldHeight);
      } else {
        this.newBelow.classList.remove('d-none');
      }
    },

    removed: function (model) {
      var view = this.lineViews[model.cid];
      if (view) {
        view.remove();
        delete this.lineViews[model.cid];
      }
    },

    scrolled: function () {
      this.following = this.atBottom();
      if (this.following) {
        this.newBelow.classList.add('d-none');
      }
    },

    scrollToBottom: function () {
      this.scroller.scrollTop = this.scroller.scrollHeight;
      this.following = true;
      this.newBelow.classList.add('d-none');
    },

    remove: function () {
      this.scroller.removeEventListener('scroll', this.onScroll);
      this.el.removeEventListener('load', this.onLoad, true);
      _.invoke(_.values(this.lineViews), 'remove');
      return Backbone.View.prototype.remove.call(this);
    }
  });
})(ChatApp, Backbone, _);
